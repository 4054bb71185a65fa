package daemon

import (
	"errors"
	"fmt"
	"math"
	"os"
	"slices"
	"time"

	"go.uber.org/zap"

	"github.com/ephysd/ephysd/drivers"
	"github.com/ephysd/ephysd/pipeline"
	"github.com/ephysd/ephysd/pipeline/spikedetect"
	"github.com/ephysd/ephysd/pyrt"
	"github.com/ephysd/ephysd/recording"
)

// PythonProcessorName is the processor name of Python stages, as in Open
// Ephys; their event channel is "Python Processor Output".
const PythonProcessorName = "Python Processor"

// firstStageID is the processor id of the first Python stage; the source is
// 100 in Open Ephys terms, stages follow it, then the record node.
const firstStageID = 101

// Chain is one acquisition, wired: source → Python stages → recorder.
type Chain struct {
	Config       *Config
	Log          *zap.Logger
	Source       drivers.Source
	Info         pipeline.StreamInfo
	BlockSamples int
	Pool         *pipeline.Pool
	Python       *pyrt.Runtime // nil without stages in ephysd's interpreter
	Stages       []PythonStage
	Spikes       *spikedetect.Detector // the built-in spike detector; nil without [spikes]
	Recorder     *recording.Recorder
	Session      *recording.Session
	Runner       *pipeline.Runner
	Realtime     bool
	// Device is the source's reopening wrapper when the source is a live
	// device (nil for sim and playback).
	Device  *drivers.ReopeningSource
	Merged  *drivers.MergedSource // when [[input]] devices add lines
	Outputs []*drivers.ReopeningSink

	started   time.Time
	stopped   time.Time
	recording bool
}

// ChainOptions let a long-running service keep its Python stages and its
// recording session (folder naming, experiment numbers) across
// acquisitions. The zero value makes a self-contained chain.
type ChainOptions struct {
	Session *recording.Session
	// Stages returns the Python stages for a stream (nil: LoadStages).
	Stages func(info pipeline.StreamInfo) (*pyrt.Runtime, []PythonStage, error)
	// RecordingFailed, if set, is told when a write error (a full disk)
	// stopped a recording; acquisition, the stages and the outputs go on
	// (recording.Config.OnError). Nil: a write error ends the acquisition.
	RecordingFailed func(rec pipeline.Recording, err error)
	// RecordingOpenFile, if set, opens the recording's data files
	// (recording.Config.OpenFile): tests put a fault-injecting disk there.
	RecordingOpenFile func(name string, flag int, perm os.FileMode) (recording.File, error)
	// ProbeSinks get every block's events after the configured outputs
	// have had them (the latency bench timestamps them there).
	ProbeSinks []pipeline.EventSink
}

// NewChain opens the source, loads the Python stages and prepares the
// recorder. A stage whose module fails to import is logged and passes data
// through (it can be fixed and reloaded); every other problem is an error.
func NewChain(cfg *Config, log *zap.Logger) (*Chain, error) {
	return NewChainWith(cfg, log, ChainOptions{})
}

// NewChainWith is NewChain with a session and stages that outlive it.
func NewChainWith(cfg *Config, log *zap.Logger, opts ChainOptions) (_ *Chain, err error) {
	c := &Chain{Config: cfg, Log: log}
	defer func() {
		if err != nil {
			c.closeAll()
		}
	}()
	if l, ok := cfg.Driver.(loggerSetter); ok {
		l.SetLogger(log)
	}
	src, err := cfg.Driver.Open()
	if err != nil {
		return nil, err
	}
	if l, ok := src.(loggerSetter); ok {
		l.SetLogger(log)
	}
	c.Source = src
	c.Info = src.Info()
	c.Realtime = true
	if p, ok := src.(drivers.Paced); ok {
		c.Realtime = p.Realtime()
	} else {
		// A live device: reopen it with backoff when it disappears.
		first := src
		c.Device, err = drivers.NewReopeningSource(cfg.Source.Driver+" source", func() (drivers.Source, error) {
			if first != nil {
				s := first
				first = nil
				return s, nil
			}
			s, err := cfg.Driver.Open()
			if l, ok := s.(loggerSetter); ok && err == nil {
				l.SetLogger(log)
			}
			return s, err
		}, log, drivers.Backoff{})
		if err != nil {
			return nil, err
		}
		c.Source = c.Device
	}
	if len(cfg.Inputs) > 0 {
		var ins []drivers.MergedInput
		for i, ic := range cfg.Inputs {
			ins = append(ins, drivers.MergedInput{Name: fmt.Sprintf("input %d (%s)", i+1, ic.Driver), Config: ic.Input, FirstLine: ic.FirstLine})
		}
		c.Merged, err = drivers.NewMergedSource(c.Source, ins, log)
		if err != nil {
			return nil, err
		}
		c.Source = c.Merged
		c.Info = c.Merged.Info()
	}
	if c.Info.SampleRate <= 0 || len(c.Info.Channels) == 0 {
		return nil, fmt.Errorf("source %s: reports %d channels at %v Hz", cfg.Source.Driver, len(c.Info.Channels), c.Info.SampleRate)
	}
	c.BlockSamples = cfg.Pipeline.BlockSamples
	if c.BlockSamples == 0 {
		c.BlockSamples = int(math.Max(1, math.Round(cfg.Pipeline.BlockMS*c.Info.SampleRate/1000)))
	}
	blockDur := float64(c.BlockSamples) / c.Info.SampleRate * 1000
	depth := int(math.Ceil(cfg.Pipeline.QueueMS / blockDur))
	if depth < 4 {
		depth = 4
	}
	stageDepth := depth
	if stall := pythonStall(cfg); stall > 0 && c.Realtime && !cfg.Pipeline.Inline {
		// A live source keeps delivering while a Python call hangs until
		// the watchdog ends it: the queue before the stages holds that long
		// and a margin to catch up, so a hung script leaves no gap.
		need := stall + pythonStallMargin
		if n := int(math.Ceil(float64(need.Milliseconds()) / blockDur)); n > depth {
			stageDepth = n
			log.Info("the queue before the Python stages holds python.block_timeout_ms and the time to end a hung call, so a hung script loses no block",
				zap.Duration("stage_queue", need), zap.Float64("queue_ms", cfg.Pipeline.QueueMS), zap.Float64("block_timeout_ms", cfg.Python.BlockTimeoutMS))
		}
	}
	c.Pool, err = pipeline.NewPool(pipeline.PoolSizeFor(depth, cfg.Recording.RecordRaw)+stageDepth-depth, len(c.Info.Channels), c.BlockSamples)
	if err != nil {
		return nil, err
	}

	var stages []pipeline.Stage
	var eventChannels []recording.EventChannel
	// The spike detector runs first, so Python stages get its spikes.
	var spikeSources []recording.SpikeSource
	if c.Spikes, spikeSources, err = newSpikeDetector(cfg, c.Info, c.BlockSamples); err != nil {
		return nil, err
	} else if c.Spikes != nil {
		stages = append(stages, c.Spikes)
	}
	if len(cfg.Stages) > 0 {
		load := opts.Stages
		if load == nil {
			load = func(info pipeline.StreamInfo) (*pyrt.Runtime, []PythonStage, error) {
				return LoadStages(cfg, info, nil, log)
			}
		}
		c.Python, c.Stages, err = load(c.Info)
		if err != nil {
			return nil, err
		}
		if c.Python != nil {
			c.Python.RegisterEventChannel(c.Info.ProcessorID, ttlChannelName(c.Info))
		}
		registerEventChannels(c)
		for _, st := range c.Stages {
			if st.ID() == c.Info.ProcessorID {
				return nil, fmt.Errorf("stage %s: processor id %d is the source's", st.Name(), st.ID())
			}
			stages = append(stages, st)
			eventChannels = append(eventChannels, recording.EventChannel{
				ProcessorID: st.ID(), ProcessorName: PythonProcessorName, ChannelName: "Python Processor Output",
			})
		}
	}

	procs := drivers.Processors{SourceID: c.Info.ProcessorID, Python: map[string]int{}}
	for _, st := range c.Stages {
		procs.Python[st.Name()] = st.ID()
	}
	var sinks []pipeline.EventSink
	for i, oc := range cfg.Outputs {
		oc := oc
		name := fmt.Sprintf("output %d (%s)", i+1, oc.Driver)
		out, err := drivers.NewReopeningSink(name, func() (drivers.Sink, error) { return oc.Sink.Open(procs) }, log, drivers.Backoff{})
		if err != nil {
			return nil, fmt.Errorf("%s: %w", name, err)
		}
		c.Outputs = append(c.Outputs, out)
		sinks = append(sinks, out)
	}
	sinks = append(sinks, opts.ProbeSinks...)

	nodeID := cfg.Recording.RecordNodeID
	if nodeID == 0 {
		nodeID = firstStageID + len(cfg.Stages)
	}
	c.Session = opts.Session
	if c.Session == nil {
		c.Session = recording.NewSession(cfg.Recording.ParentDirectory, nodeID, nil)
	}
	c.Recorder, err = recording.NewRecorder(recording.Config{
		Stream: c.Info, RecordNodeID: nodeID, RecordRaw: cfg.Recording.RecordRaw,
		EventChannels: eventChannels, SpikeSources: spikeSources, Log: log,
		CheckpointInterval: time.Duration(cfg.Recording.FlushMS) * time.Millisecond,
		Fsync:              recording.FsyncPolicy(cfg.Recording.Fsync),
		OnError:            opts.RecordingFailed, OpenFile: opts.RecordingOpenFile,
	})
	if err != nil {
		return nil, err
	}
	rc := pipeline.RunnerConfig{
		Source: c.Source, SourceID: c.Info.ProcessorID, Pool: c.Pool, Stages: stages,
		EventSinks: sinks, Consumers: []pipeline.Consumer{c.Recorder}, KeepRaw: cfg.Recording.RecordRaw,
		QueueDepth: depth, StageQueueDepth: stageDepth, Backpressure: !c.Realtime, Inline: cfg.Pipeline.Inline,
		Interrupt: func() { _ = c.Source.Stop() }, Log: log,
	}
	if rt := cfg.Realtime; rt.Priority > 0 || len(rt.CPUs) > 0 {
		rc.ThreadSetup = (&realtimeSetup{cfg: rt, log: log}).thread
	}
	if c.Python != nil {
		rc.Executor = c.Python
	}
	c.Runner, err = pipeline.NewRunner(rc)
	if err != nil {
		return nil, err
	}
	return c, nil
}

// StartPython starts (or returns) the embedded interpreter chosen by cfg.
func StartPython(cfg *Config, log *zap.Logger) (*pyrt.Runtime, error) {
	return pyrt.Start(pyrt.Config{
		Executable: cfg.Python.Executable, Venv: cfg.Python.Venv,
		SwitchInterval: time.Duration(cfg.Python.SwitchIntervalUS * float64(time.Microsecond)),
		BlockTimeout:   blockTimeout(cfg.Python.BlockTimeoutMS),
		Log:            log,
	})
}

// LoadStages makes the Python stages of cfg for a stream. Stages given in
// keep (from an earlier acquisition) are reused when they have the same
// module and isolation and the stream the same shape, and re-initialised
// (__init__ with the new channel count and rate) when only the shape
// changed, as Open Ephys does; the isolated ones not reused are closed
// (their workers stop). A module that fails to import leaves its stage
// passing data through; a missing file is an error. The runtime is nil
// when every stage is isolated.
func LoadStages(cfg *Config, info pipeline.StreamInfo, keep []PythonStage, log *zap.Logger) (_ *pyrt.Runtime, _ []PythonStage, err error) {
	var rt *pyrt.Runtime
	if needsInterpreter(cfg) {
		if rt, err = StartPython(cfg, log); err != nil {
			return nil, nil, err
		}
	}
	var out, made []PythonStage
	defer func() {
		if err != nil {
			for _, st := range made {
				closeStage(st)
			}
		}
	}()
	for i, sc := range cfg.Stages {
		id := firstStageID + i
		want := pyrt.StageConfig{
			ID: id, Name: sc.Name, Path: sc.Module, Channels: len(info.Channels),
			SampleRate: info.SampleRate, OnError: pyrt.OnError(sc.OnError),
		}
		isolate := sc.Isolation == IsolationProcess
		if i < len(keep) && keep[i].SameModule(want) && isolatedStage(keep[i]) == isolate {
			if err := keep[i].Reshape(want.Channels, want.SampleRate); err != nil {
				log.Warn("python stage could not be re-initialised for the new stream", zap.String("stage", keep[i].Name()), zap.Error(err))
			}
			out = append(out, keep[i])
			continue
		}
		var st PythonStage
		if isolate {
			iso, err := newIsolatedStage(cfg, want, blockSamplesFor(cfg, info), log)
			if iso == nil {
				return nil, nil, err
			}
			st = iso
		} else {
			in, err := rt.NewStage(want)
			if in == nil {
				return nil, nil, err
			}
			st = in
		}
		made = append(made, st)
		out = append(out, st)
	}
	for _, k := range keep {
		if !slices.Contains(out, k) {
			closeStage(k)
		}
	}
	return rt, out, nil
}

// loggerSetter is implemented by drivers (configurations or sources) that
// log what their device does (lost packets, messages).
type loggerSetter interface{ SetLogger(*zap.Logger) }

// pythonStallMargin is what the queue before the Python stages holds
// beyond the longest a hung call can stall them (pythonStall): time to
// catch up.
const pythonStallMargin = 500 * time.Millisecond

// pythonStall is the longest one hung Python call can hold up the stages
// (pyrt.MaxStall of the block timeout); 0 without stages or timeout.
func pythonStall(cfg *Config) time.Duration {
	if len(cfg.Stages) == 0 {
		return 0
	}
	return pyrt.MaxStall(blockTimeout(cfg.Python.BlockTimeoutMS))
}

func blockTimeout(ms float64) time.Duration {
	if ms == 0 {
		return -1 // never
	}
	return time.Duration(ms * float64(time.Millisecond))
}

func ttlChannelName(info pipeline.StreamInfo) string {
	if info.TTLChannelName != "" {
		return info.TTLChannelName
	}
	return "TTL Input"
}

// Start starts the device and the pipeline.
func (c *Chain) Start() error {
	if err := c.Source.Start(); err != nil {
		return err
	}
	c.started = time.Now()
	if err := c.Runner.Start(); err != nil {
		_ = c.Source.Stop()
		return err
	}
	c.Log.Info("acquisition started", zap.String("source", c.Info.ProcessorName),
		zap.Int("channels", len(c.Info.Channels)), zap.Float64("rate_hz", c.Info.SampleRate),
		zap.Int("block_samples", c.BlockSamples), zap.Bool("realtime", c.Realtime), zap.Int("python_stages", len(c.Stages)))
	return nil
}

// StartRecording starts a new recording at the next block.
func (c *Chain) StartRecording() (*pipeline.Recording, error) {
	rec, err := c.Session.Next()
	if err != nil {
		return nil, err
	}
	c.Runner.StartRecording(rec)
	c.recording = true
	c.Log.Info("recording started", zap.String("path", recording.RecordingPath(rec, c.Session.RecordNodeID())))
	return rec, nil
}

// ReloadStages re-imports every Python stage's module while acquiring
// (SIGHUP). A module that fails to load is logged and its previous version
// keeps running.
func (c *Chain) ReloadStages() {
	for _, s := range c.Stages {
		c.Log.Info("reloading python module", zap.String("stage", s.Name()), zap.String("module", s.Path()))
		_ = s.Reload() // logged by the stage
	}
}

// StopRecording ends the recording at the next block.
func (c *Chain) StopRecording() {
	c.Runner.StopRecording()
	c.recording = false
}

// Stop stops the device, lets every block already read go through the
// stages to the recorder, finalises the recording and releases everything.
// It returns the first error of the run.
func (c *Chain) Stop() error {
	c.Runner.Stop()
	warn := time.NewTicker(5 * time.Second)
	defer warn.Stop()
	for waiting := true; waiting; {
		select {
		case <-c.Runner.Done():
			waiting = false
		case <-warn.C:
			c.Log.Warn("still waiting for the last blocks to go through the pipeline: a Python stage may be blocked; " +
				"send SIGINT again to quit at once — the recording on disk is readable up to its last checkpoint (≤ 1 s old)")
		}
	}
	err := c.Runner.Wait()
	c.stopped = time.Now()
	c.Session.AcquisitionStopped()
	c.closeAll()
	return err
}

// Elapsed is the wall-clock time from Start to Stop (or now).
func (c *Chain) Elapsed() time.Duration {
	if c.started.IsZero() {
		return 0
	}
	if c.stopped.IsZero() {
		return time.Since(c.started)
	}
	return c.stopped.Sub(c.started)
}

func (c *Chain) closeAll() {
	var errs []error
	if c.Source != nil {
		errs = append(errs, c.Source.Close())
	}
	for _, o := range c.Outputs {
		errs = append(errs, o.Close())
	}
	if c.Pool != nil {
		keep := false
		for _, s := range c.Stages {
			keep = keep || s.Retained()
		}
		if err := c.Pool.Close(keep); err != nil && !errors.Is(err, pipeline.ErrPoolInUse) {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		c.Log.Warn("closing the chain", zap.Error(err))
	}
}
