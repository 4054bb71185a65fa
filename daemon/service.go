package daemon

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/ephysd/ephysd/drivers"
	"github.com/ephysd/ephysd/pipeline"
	"github.com/ephysd/ephysd/pyrt"
	"github.com/ephysd/ephysd/recording"
)

// Mode is the daemon's state, named as the Open Ephys API names it.
type Mode string

// The three states.
const (
	Idle    Mode = "IDLE"    // nothing runs; the device is closed
	Acquire Mode = "ACQUIRE" // samples flow through the stages
	Record  Mode = "RECORD"  // … and are recorded
)

// ParseMode accepts the Open Ephys names in any case.
func ParseMode(s string) (Mode, error) {
	switch m := Mode(strings.ToUpper(strings.TrimSpace(s))); m {
	case Idle, Acquire, Record:
		return m, nil
	}
	return "", fmt.Errorf("mode %q: use IDLE, ACQUIRE or RECORD", s)
}

// Service is the running daemon: it owns the configuration, the Python
// stages and the recording session, and, while acquiring, the chain. Its
// methods are safe for concurrent use; transitions are serialised.
type Service struct {
	log *zap.Logger

	mu      sync.Mutex // serialises transitions and guards the fields below
	cfg     *Config
	session *recording.Session
	python  *pyrt.Runtime
	stages  []PythonStage
	chain   *Chain
	mode    Mode
	recAt   time.Time           // when the current recording started
	rec     *pipeline.Recording // the current (or last) recording
	lastErr string              // why acquisition last ended by itself
	started time.Time
	// recErr is why the last recording stopped by itself (a full disk),
	// until the next record start; recFailures counts such stops.
	recErr      string
	recFailures uint64
	// recordingOpenFile opens the recordings' data files (nil: the
	// operating system's); tests put a fault-injecting disk here.
	recordingOpenFile func(name string, flag int, perm os.FileMode) (recording.File, error)

	// ended is signalled when a chain ends by itself (source ended,
	// failure); the service then returns to IDLE.
	ended chan struct{}
}

// NewService makes the daemon's service in IDLE.
func NewService(cfg *Config, log *zap.Logger) (*Service, error) {
	nodeID := cfg.Recording.RecordNodeID
	if nodeID == 0 {
		nodeID = firstStageID + len(cfg.Stages)
	}
	s := &Service{
		log:     log,
		cfg:     cfg,
		session: recording.NewSession(cfg.Recording.ParentDirectory, nodeID, nil),
		mode:    Idle,
		started: time.Now(),
		ended:   make(chan struct{}, 1),
	}
	return s, nil
}

// Config returns the configuration in force.
func (s *Service) Config() *Config {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.cfg
}

// Mode returns the current state.
func (s *Service) Mode() Mode {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.mode
}

// Chain returns the running chain, or nil when IDLE.
func (s *Service) Chain() *Chain {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.chain
}

// Stages returns the Python stages (loaded at the first acquisition).
func (s *Service) Stages() []PythonStage {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]PythonStage(nil), s.stages...)
}

// Session returns the recording session (naming and numbering).
func (s *Service) Session() *recording.Session { return s.session }

// Ended is signalled when acquisition ended by itself (the source ended or
// failed); the service is then IDLE and LastError says why.
func (s *Service) Ended() <-chan struct{} { return s.ended }

// LastError is why acquisition last ended by itself ("" if it did not).
func (s *Service) LastError() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.lastErr
}

// SetMode moves to m, through ACQUIRE when needed: IDLE → RECORD starts
// acquisition then recording; RECORD → IDLE stops recording (all files
// finalised) then acquisition. The Python hooks run at each step.
func (s *Service) SetMode(m Mode) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.setModeLocked(m)
}

func (s *Service) setModeLocked(m Mode) error {
	switch m {
	case Idle, Acquire, Record:
	default:
		return fmt.Errorf("mode %q: use IDLE, ACQUIRE or RECORD", m)
	}
	if m == s.mode {
		return nil
	}
	if s.mode == Idle {
		if err := s.startAcquisitionLocked(); err != nil {
			return err
		}
	}
	if m == Record {
		rec, err := s.chain.StartRecording()
		if err != nil {
			return err
		}
		s.rec, s.recAt, s.mode, s.recErr = rec, time.Now(), Record, ""
		return nil
	}
	if s.mode == Record {
		s.chain.StopRecording()
		s.mode = Acquire
		s.log.Info("recording stopped", zap.String("path", recording.RecordingPath(s.rec, s.session.RecordNodeID())))
	}
	if m == Idle {
		return s.stopAcquisitionLocked()
	}
	return nil
}

func (s *Service) startAcquisitionLocked() error {
	chain, err := NewChainWith(s.cfg, s.log, ChainOptions{Session: s.session, Stages: s.stagesFor,
		RecordingFailed: func(rec pipeline.Recording, err error) {
			// Called from the recorder's goroutine, which a transition
			// holding s.mu may be waiting for.
			go s.recordingFailed(rec, err)
		},
		RecordingOpenFile: s.recordingOpenFile,
	})
	if err != nil {
		return err
	}
	if err := chain.Start(); err != nil {
		chain.Stop()
		return err
	}
	s.chain, s.mode, s.lastErr = chain, Acquire, ""
	go s.watch(chain)
	return nil
}

// stagesFor loads the Python stages for a stream, keeping the ones that
// are already loaded (called by NewChainWith with s.mu held).
func (s *Service) stagesFor(info pipeline.StreamInfo) (*pyrt.Runtime, []PythonStage, error) {
	rt, stages, err := LoadStages(s.cfg, info, s.stages, s.log)
	if err != nil {
		return nil, nil, err
	}
	s.python, s.stages = rt, stages
	return rt, stages, nil
}

// watch returns the service to IDLE when the chain ends by itself.
func (s *Service) watch(c *Chain) {
	<-c.Runner.Done()
	s.mu.Lock()
	if s.chain != c { // stopped on purpose
		s.mu.Unlock()
		return
	}
	err := c.Stop()
	reason := "the source ended"
	if err != nil {
		reason = err.Error()
	}
	s.log.Error("acquisition ended by itself; ephysd is IDLE", zap.String("reason", reason))
	s.chain, s.mode, s.lastErr = nil, Idle, reason
	s.mu.Unlock()
	select {
	case s.ended <- struct{}{}:
	default:
	}
}

// recordingFailed is told that a write error (a full disk) stopped
// recording rec: while rec is still the current recording, the service
// stops recording and keeps acquiring (the Python stages and the outputs
// go on), and reports the error until the next record start.
func (s *Service) recordingFailed(rec pipeline.Recording, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.recFailures++
	s.recErr = err.Error()
	if s.mode == Record && s.rec != nil && *s.rec == rec && s.chain != nil {
		s.chain.StopRecording()
		s.mode = Acquire
		s.log.Error("recording failed: ephysd stopped recording and keeps acquiring; start a new recording once the problem is fixed",
			zap.String("path", recording.RecordingPath(s.rec, s.session.RecordNodeID())), zap.Error(err))
		return
	}
	s.log.Error("recording failed", zap.String("path", recording.RecordingPath(&rec, s.session.RecordNodeID())), zap.Error(err))
}

// RecordingFailure is why the last recording stopped by itself ("" if it
// did not, or a recording started since) and how many recordings stopped
// so since ephysd started.
func (s *Service) RecordingFailure() (string, uint64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.recErr, s.recFailures
}

func (s *Service) stopAcquisitionLocked() error {
	c := s.chain
	s.chain, s.mode = nil, Idle
	err := c.Stop()
	s.log.Info("acquisition stopped", zap.Uint64("samples", c.Runner.Stats().Samples))
	return err
}

// Message records text in MessageCenter at the next block. It needs
// acquisition running.
func (s *Service) Message(text string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.chain == nil {
		return errors.New("not acquiring: messages are stamped with a sample number, so start acquisition first")
	}
	s.chain.Runner.Message(text)
	return nil
}

// Reload applies the configuration file anew (SIGHUP, the API). While
// acquiring, a change of the Python modules is applied at once, between two
// blocks; any other change waits for the next acquisition and the returned
// text says so. Every stage's module is re-imported either way.
func (s *Service) Reload(path string) (string, error) {
	var next *Config
	if path != "" {
		var err error
		if next, err = LoadConfig(path); err != nil {
			return "", err
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if next == nil {
		next = s.cfg
	}
	var notes []string
	if !reflect.DeepEqual(next.Python, s.cfg.Python) && s.python != nil {
		notes = append(notes, "the [python] interpreter settings take effect when ephysd restarts")
	}
	stagesSame := len(next.Stages) == len(s.cfg.Stages)
	restOld, restNew := *s.cfg, *next
	restOld.Stages, restNew.Stages = nil, nil
	restOld.Python, restNew.Python = PythonConfig{}, PythonConfig{}
	restOld.Driver, restNew.Driver = nil, nil
	restOld.path, restNew.path = "", ""
	otherChanged := !reflect.DeepEqual(restOld, restNew) || !reflect.DeepEqual(s.cfg.Driver, next.Driver)

	if s.chain != nil && !stagesSame {
		notes = append(notes, "the number of [[stage]] entries changed: it takes effect at the next acquisition (set IDLE, then ACQUIRE)")
	}
	if s.chain != nil && otherChanged {
		notes = append(notes, "source, pipeline, output or recording settings changed: they take effect at the next acquisition (set IDLE, then ACQUIRE)")
	}
	var errs []error
	if s.chain != nil && stagesSame {
		for i, st := range s.stages {
			want := next.Stages[i]
			var err error
			if abs, _ := filepath.Abs(want.Module); abs != st.Path() {
				err = st.SetModule(want.Module)
			} else {
				err = st.Reload()
			}
			if err != nil {
				errs = append(errs, fmt.Errorf("stage %s: %w (its previous module keeps running)", st.Name(), err))
				// The configuration in force names the module that runs.
				next.Stages[i].Module = st.Path()
			}
		}
	}
	if s.chain == nil {
		// Nothing runs: the new settings (and fresh modules) apply at the
		// next acquisition. Isolated stages stop their workers.
		for _, st := range s.stages {
			closeStage(st)
		}
		s.stages = nil
	}
	s.cfg = next
	if len(errs) > 0 {
		return strings.Join(notes, "; "), errors.Join(errs...)
	}
	return strings.Join(notes, "; "), nil
}

// ReloadStages re-imports every Python stage's module (while acquiring,
// between two blocks).
func (s *Service) ReloadStages() error {
	s.mu.Lock()
	stages := append([]PythonStage(nil), s.stages...)
	s.mu.Unlock()
	var errs []error
	for _, st := range stages {
		if err := st.Reload(); err != nil {
			errs = append(errs, fmt.Errorf("stage %s: %w", st.Name(), err))
		}
	}
	return errors.Join(errs...)
}

// SetStageModule points stage id at another module file, which must lie in
// one of the configured module folders ([control] module_dirs): loading a
// module is running code.
func (s *Service) SetStageModule(id int, path string) error {
	abs, err := filepath.Abs(path)
	if err != nil {
		return err
	}
	s.mu.Lock()
	dirs := s.cfg.Control.ModuleDirs
	var st PythonStage
	for _, x := range s.stages {
		if x.ID() == id {
			st = x
		}
	}
	s.mu.Unlock()
	allowed := false
	for _, d := range dirs {
		if rel, err := filepath.Rel(d, abs); err == nil && !strings.HasPrefix(rel, "..") && !filepath.IsAbs(rel) {
			allowed = true
		}
	}
	if !allowed {
		return fmt.Errorf("module %s is outside the folders modules may be loaded from (%s): add its folder to [control] module_dirs", abs, strings.Join(dirs, ", "))
	}
	if st == nil {
		return fmt.Errorf("no Python stage with processor id %d is loaded (stages load at the first acquisition)", id)
	}
	return st.SetModule(abs)
}

// Healthy is nil unless the pipeline has stalled: acquiring, but no block
// has reached the recorder for a while. The systemd watchdog uses it.
func (s *Service) Healthy() error {
	s.mu.Lock()
	c := s.chain
	s.mu.Unlock()
	if c == nil {
		return nil
	}
	limit := 2 * time.Second
	if bd := time.Duration(float64(c.BlockSamples) / c.Info.SampleRate * 100 * float64(time.Second)); bd > limit {
		limit = bd
	}
	last := c.Runner.LastBlock()
	if last.IsZero() {
		last = c.started
	}
	if since := time.Since(last); since > limit {
		return fmt.Errorf("pipeline stalled: no block has reached the recorder for %s", since.Round(time.Millisecond))
	}
	return nil
}

// CheckSource opens and closes the configured source once, so that a
// missing device is reported at start-up rather than at the first
// acquisition.
func (s *Service) CheckSource() error {
	s.mu.Lock()
	cfg := s.cfg
	s.mu.Unlock()
	src, err := cfg.Driver.Open()
	if err != nil {
		return err
	}
	return src.Close()
}

// Close stops recording (files finalised) and acquisition.
func (s *Service) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.mode == Idle {
		return nil
	}
	return s.setModeLocked(Idle)
}

// Status is a snapshot of everything the daemon reports.
type Status struct {
	Mode          Mode           `json:"mode"`
	Uptime        float64        `json:"uptime_s"`
	LastError     string         `json:"last_error,omitempty"`
	Source        *SourceStatus  `json:"source,omitempty"`
	Pipeline      *PipelineInfo  `json:"pipeline,omitempty"`
	Stages        []StageInfo    `json:"stages"`
	Outputs       []DeviceInfo   `json:"outputs,omitempty"`
	Inputs        []DeviceInfo   `json:"inputs,omitempty"`
	Recording     *RecordingInfo `json:"recording,omitempty"`
	SessionFolder string         `json:"session_folder,omitempty"`
	// RecordingError is why the last recording stopped by itself (a full
	// disk), until the next record start; RecordingFailures counts such
	// stops since ephysd started.
	RecordingError    string `json:"recording_error,omitempty"`
	RecordingFailures uint64 `json:"recording_failures"`
	// Spikes are the spike detector's counts per electrode ([spikes]).
	Spikes []ElectrodeSpikes `json:"spikes,omitempty"`
}

// SourceStatus describes the acquiring source.
type SourceStatus struct {
	Driver     string      `json:"driver"`
	Name       string      `json:"name"`
	Channels   int         `json:"channels"`
	SampleRate float64     `json:"sample_rate"`
	Device     *DeviceInfo `json:"device,omitempty"`
}

// DeviceInfo is a device's connection state.
type DeviceInfo struct {
	Name        string `json:"name,omitempty"`
	Connected   bool   `json:"connected"`
	Disconnects uint64 `json:"disconnects"`
	LastError   string `json:"last_error,omitempty"`
	Dropped     uint64 `json:"dropped_event_blocks,omitempty"`
}

// PipelineInfo is the runner's counters and timings.
type PipelineInfo struct {
	BlockSamples   int     `json:"block_samples"`
	Blocks         uint64  `json:"blocks"`
	Samples        uint64  `json:"samples"`
	SamplesPerSec  float64 `json:"samples_per_s"`
	Overruns       uint64  `json:"overruns"`
	OverrunSamples uint64  `json:"overrun_samples"`
	Gaps           uint64  `json:"gaps"`
	GapSamples     uint64  `json:"gap_samples"`
	Events         uint64  `json:"events"`
	LatencyP50     float64 `json:"latency_p50_us"` // source read → event sinks
	LatencyP99     float64 `json:"latency_p99_us"`
	LatencyMax     float64 `json:"latency_max_us"`
	QueueStages    int     `json:"queue_stages"`
	QueueRecorder  int     `json:"queue_recorder"`
}

// StageInfo is one Python stage.
type StageInfo struct {
	pyrt.StageStatus
	P50 float64 `json:"p50_us"`
	P99 float64 `json:"p99_us"`
	Max float64 `json:"max_us"`
}

// RecordingInfo is the recording in progress.
type RecordingInfo struct {
	Path       string  `json:"path"`
	Experiment int     `json:"experiment"`
	Number     int     `json:"recording"`
	Seconds    float64 `json:"duration_s"`
	Bytes      int64   `json:"bytes"`
}

func us(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }

// Status returns a snapshot.
func (s *Service) Status() Status {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := Status{Mode: s.mode, Uptime: time.Since(s.started).Seconds(), LastError: s.lastErr, SessionFolder: s.session.Dir(),
		RecordingError: s.recErr, RecordingFailures: s.recFailures}
	c := s.chain
	for i, x := range s.stages {
		si := StageInfo{StageStatus: x.Status()}
		if c != nil && i < len(c.Stages) {
			h := c.PythonStageTime(i)
			si.P50, si.P99, si.Max = us(h.Quantile(0.5)), us(h.Quantile(0.99)), us(h.Max())
		}
		st.Stages = append(st.Stages, si)
	}
	if c == nil {
		return st
	}
	st.Source = &SourceStatus{Driver: s.cfg.Source.Driver, Name: c.Info.ProcessorName, Channels: len(c.Info.Channels), SampleRate: c.Info.SampleRate}
	if c.Device != nil {
		st.Source.Device = deviceInfo(c.Config.Source.Driver, c.Device.State(), 0)
	}
	rs := c.Runner.Stats()
	qs, qc := c.Runner.QueueDepths()
	lat := c.Runner.Latency()
	p := &PipelineInfo{
		BlockSamples: c.BlockSamples, Blocks: rs.Blocks, Samples: rs.Samples,
		Overruns: rs.OverrunBlocks, OverrunSamples: rs.OverrunSamples, Gaps: rs.Gaps, GapSamples: rs.GapSamples,
		Events: rs.Events, LatencyP50: us(lat.Quantile(0.5)), LatencyP99: us(lat.Quantile(0.99)), LatencyMax: us(lat.Max()),
		QueueStages: qs, QueueRecorder: qc,
	}
	if el := c.Elapsed().Seconds(); el > 0 {
		p.SamplesPerSec = float64(rs.Samples) / el
	}
	st.Pipeline = p
	st.Spikes = c.spikeCounts()
	for i, o := range c.Outputs {
		st.Outputs = append(st.Outputs, *deviceInfo(fmt.Sprintf("output %d (%s)", i+1, c.Config.Outputs[i].Driver), o.State(), o.Dropped()))
	}
	if c.Merged != nil {
		for i, d := range c.Merged.InputStates() {
			st.Inputs = append(st.Inputs, *deviceInfo(fmt.Sprintf("input %d (%s)", i+1, c.Config.Inputs[i].Driver), d, 0))
		}
	}
	if s.mode == Record && s.rec != nil {
		path := recording.RecordingPath(s.rec, s.session.RecordNodeID())
		st.Recording = &RecordingInfo{Path: path, Experiment: s.rec.Experiment, Number: s.rec.Number,
			Seconds: time.Since(s.recAt).Seconds(), Bytes: dirSize(path)}
	}
	return st
}

func deviceInfo(name string, d drivers.DeviceState, dropped uint64) *DeviceInfo {
	return &DeviceInfo{Name: name, Connected: d.Connected, Disconnects: d.Disconnects, LastError: d.LastError, Dropped: dropped}
}

// dirSize is the size of the files below dir.
func dirSize(dir string) int64 {
	var n int64
	filepath.WalkDir(dir, func(_ string, d os.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			if fi, err := d.Info(); err == nil {
				n += fi.Size()
			}
		}
		return nil
	})
	return n
}
