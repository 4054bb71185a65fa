package pyrt

/*
#include <stdlib.h>
#include "ephys_py.h"
*/
import "C"

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"
	"unsafe"

	"go.uber.org/zap"

	"github.com/ephysd/ephysd/pipeline"
)

// OnError says what a stage does after its Python code raised in process
// or a handler.
type OnError string

const (
	// OnErrorContinue: the block that failed passes on unchanged, later
	// blocks still go to Python. Right for a rare, transient error in a long
	// experiment.
	OnErrorContinue OnError = "continue"
	// OnErrorDisable: the stage passes every later block through unchanged
	// until it is reloaded.
	OnErrorDisable OnError = "disable"
)

// StageConfig describes one Python stage.
type StageConfig struct {
	ID         int    // processor id: its events carry it (e.g. 101, 102, …)
	Name       string // shown in logs and status; default: the file name without .py
	Path       string // the Python module file
	Channels   int
	SampleRate float64
	OnError    OnError // default OnErrorContinue
}

// StageStatus is what the daemon reports about a stage.
type StageStatus struct {
	ID        int
	Name      string
	Path      string
	State     string // "running", "failed" (raised; still called), "disabled", "not loaded"
	Errors    uint64 // exceptions raised so far
	LastError string // the last exception's last line
	Retained  bool   // the script keeps a reference to a data array
}

// Stage runs an Open Ephys Python Processor module as a pipeline stage.
// Process and the hooks must run on the interpreter thread (the runner's
// stage loop does, with the Runtime as its Executor).
type Stage struct {
	rt      *Runtime
	c       *C.ephys_stage
	cfg     StageConfig
	name    string
	modname string
	log     *zap.Logger

	backup []float32
	word   uint64 // state of this stage's output lines

	mu         sync.Mutex
	loaded     bool
	disabled   bool
	failedNow  bool
	errors     uint64
	lastError  string
	loggedFull bool
	retained   bool

	errLog     pipeline.LogLimiter
	droppedLog pipeline.LogLimiter

	acquiring bool
	recording *pipeline.Recording
}

// NewStage makes a stage and loads its module. A module that fails to
// import or construct is logged with its traceback and the stage passes
// data through unchanged until it is reloaded: the returned error says so,
// and the stage is usable either way. A missing file is an error and no
// stage.
func (rt *Runtime) NewStage(cfg StageConfig) (*Stage, error) {
	abs, err := filepath.Abs(cfg.Path)
	if err != nil {
		return nil, fmt.Errorf("python module %s: %w", cfg.Path, err)
	}
	if fi, err := os.Stat(abs); err != nil || fi.IsDir() {
		return nil, fmt.Errorf("python module %s: no such file", abs)
	}
	cfg.Path = abs
	if cfg.OnError == "" {
		cfg.OnError = OnErrorContinue
	}
	if cfg.OnError != OnErrorContinue && cfg.OnError != OnErrorDisable {
		return nil, fmt.Errorf("python module %s: on_error %q: use \"continue\" or \"disable\"", abs, cfg.OnError)
	}
	stem := strings.TrimSuffix(filepath.Base(abs), ".py")
	name := cfg.Name
	if name == "" {
		name = stem
	}
	rt.mu.Lock()
	modname := stem
	if owner, taken := rt.moduleNames[modname]; taken && owner != cfg.ID {
		modname = fmt.Sprintf("%s__ephysd_stage%d", stem, cfg.ID)
	}
	rt.moduleNames[modname] = cfg.ID
	rt.mu.Unlock()

	cname := C.CString(name)
	c := C.ephys_stage_new(C.int(cfg.ID), cname)
	C.free(unsafe.Pointer(cname))
	if c == nil {
		return nil, fmt.Errorf("python module %s: cannot create the stage", abs)
	}
	s := &Stage{
		rt: rt, c: c, cfg: cfg, name: name, modname: modname,
		log:    rt.log.With(zap.String("stage", name)),
		backup: make([]float32, 0),
	}
	stageNames.Store(cfg.ID, s)
	rt.RegisterEventChannel(cfg.ID, "Python Processor Output")
	return s, s.Load()
}

// load imports the module and makes an instance (on the calling goroutine,
// which takes the GIL), then makes it current on the interpreter thread.
func (s *Stage) load() error {
	cpath := C.CString(s.cfg.Path)
	cmod := C.CString(s.modname)
	var cerr *C.char
	rc := C.ephys_stage_load(s.c, cpath, cmod, C.int(s.cfg.Channels), C.double(s.cfg.SampleRate), &cerr)
	C.free(unsafe.Pointer(cpath))
	C.free(unsafe.Pointer(cmod))
	if rc != 0 {
		text := C.GoString(cerr)
		C.free(unsafe.Pointer(cerr))
		what := "import"
		if rc == 2 {
			what = "PyProcessor(...)"
		}
		return &LoadError{Path: s.cfg.Path, What: what, Traceback: text}
	}
	return nil
}

// LoadError is a module that could not be imported or instantiated.
type LoadError struct {
	Path, What, Traceback string
}

func (e *LoadError) Error() string {
	return fmt.Sprintf("python module %s: %s raised:\n%s", e.Path, e.What, e.Traceback)
}

// Load loads the module for the first time and makes it current; run it
// before the pipeline starts. On failure the stage stays in pass-through.
func (s *Stage) Load() error {
	err := s.load()
	if err == nil {
		s.rt.Do(func() { err = s.commit() })
	}
	s.afterLoad(err)
	return err
}

func (s *Stage) commit() error {
	switch C.ephys_stage_commit(s.c) {
	case 0:
		return nil
	case -1:
		panic("pyrt: stage commit off the interpreter thread")
	default:
		return errors.New("pyrt: nothing loaded to commit")
	}
}

func (s *Stage) afterLoad(err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err != nil {
		var le *LoadError
		if errors.As(err, &le) {
			s.lastError = lastLine(le.Traceback)
		} else {
			s.lastError = err.Error()
		}
		s.errors++
		if !s.loaded {
			s.log.Error("python module failed to load; the stage passes data through unchanged until it is reloaded",
				zap.String("module", s.cfg.Path), zap.String("traceback", errorText(err)))
		} else {
			s.log.Error("python module reload failed; the previous version keeps running",
				zap.String("module", s.cfg.Path), zap.String("traceback", errorText(err)))
		}
		return
	}
	s.loaded = true
	s.disabled = false
	s.failedNow = false
	s.loggedFull = false
	s.lastError = ""
	s.log.Info("python module loaded", zap.String("module", s.cfg.Path), zap.String("module_name", s.modname))
}

func errorText(err error) string {
	var le *LoadError
	if errors.As(err, &le) {
		return le.Traceback
	}
	return err.Error()
}

func lastLine(s string) string {
	s = strings.TrimSpace(s)
	if i := strings.LastIndexByte(s, '\n'); i >= 0 {
		return s[i+1:]
	}
	return s
}

// Reload re-imports the module and makes a new instance while the pipeline
// may be running. The import happens off the stage thread; the switch
// happens between two blocks, so no block is lost: the old instance gets
// stop_recording/stop_acquisition if they apply, the new one
// start_acquisition/start_recording. If the new version fails to load, the
// old one keeps running and the error is returned.
func (s *Stage) Reload() error {
	err := s.load()
	if err == nil {
		s.rt.Do(func() {
			if s.recording != nil {
				s.hook(C.EPHYS_HOOK_STOP_REC, "", "stop_recording")
			}
			if s.acquiring {
				s.hook(C.EPHYS_HOOK_STOP_ACQ, "", "stop_acquisition")
			}
			err = s.commit()
			if err != nil {
				return
			}
			s.mu.Lock()
			s.loaded, s.disabled, s.failedNow, s.loggedFull = true, false, false, false
			s.mu.Unlock()
			if s.acquiring {
				s.hook(C.EPHYS_HOOK_START_ACQ, "", "start_acquisition")
			}
			if s.recording != nil {
				s.hook(C.EPHYS_HOOK_START_REC, s.recording.Dir, "start_recording")
			}
		})
	}
	s.afterLoad(err)
	return err
}

// Name is the stage's display name.
func (s *Stage) Name() string { return s.name }

// ID is the stage's processor id.
func (s *Stage) ID() int { return s.cfg.ID }

// Path is the module file.
func (s *Stage) Path() string { return s.cfg.Path }

// Retained reports whether the script kept a reference to a data array, so
// the block memory must outlive the pipeline (pipeline.Pool.Close(keep)).
func (s *Stage) Retained() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.retained
}

// Status reports the stage's state.
func (s *Stage) Status() StageStatus {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := StageStatus{ID: s.cfg.ID, Name: s.name, Path: s.cfg.Path, Errors: s.errors, LastError: s.lastError, Retained: s.retained}
	switch {
	case !s.loaded:
		st.State = "not loaded"
	case s.disabled:
		st.State = "disabled"
	case s.failedNow:
		st.State = "failed"
	default:
		st.State = "running"
	}
	return st
}

func (s *Stage) active() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.loaded && !s.disabled
}

// raised handles an exception the C side kept: logged once in full, then
// rate-limited to its last line.
func (s *Stage) raised(where string, firstSample int64) {
	s.mu.Lock()
	s.errors++
	s.failedNow = true
	full := !s.loggedFull
	s.loggedFull = true
	disable := s.cfg.OnError == OnErrorDisable
	if disable {
		s.disabled = true
	}
	s.mu.Unlock()

	if full {
		text := s.takeError(1)
		s.setLast(lastLine(text))
		msg := "python stage raised; the block passes on unchanged and acquisition and recording continue"
		if disable {
			msg = "python stage raised; it is disabled (data passes through unchanged) until reloaded"
		}
		s.log.Error(msg, zap.String("in", where), zap.Int64("first_sample", firstSample), zap.String("traceback", text))
		return
	}
	if ok, more := s.errLog.Allow(time.Now()); ok {
		text := s.takeError(0)
		s.setLast(text)
		s.log.Error("python stage raised again", zap.String("in", where), zap.Int64("first_sample", firstSample),
			zap.String("error", text), zap.Int("more_not_logged", more))
		return
	}
	s.takeError(-1)
}

func (s *Stage) setLast(text string) {
	s.mu.Lock()
	s.lastError = text
	s.mu.Unlock()
}

func (s *Stage) takeError(full int) string {
	c := C.ephys_stage_error(s.c, C.int(full))
	if c == nil {
		return ""
	}
	defer C.free(unsafe.Pointer(c))
	return C.GoString(c)
}

func (s *Stage) hook(which C.int, arg string, name string) {
	var carg *C.char
	if which == C.EPHYS_HOOK_START_REC {
		carg = C.CString(arg)
		defer C.free(unsafe.Pointer(carg))
	}
	switch C.ephys_stage_hook(s.c, which, carg) {
	case 1:
		s.raised(name, -1)
	case -1:
		panic("pyrt: " + name + " called off the interpreter thread")
	}
}

// StartAcquisition implements pipeline.AcquisitionHooks.
func (s *Stage) StartAcquisition() error {
	s.acquiring = true
	C.ephys_stage_set_accepting(s.c, 1)
	if s.active() {
		s.hook(C.EPHYS_HOOK_START_ACQ, "", "start_acquisition")
	}
	return nil
}

// StopAcquisition implements pipeline.AcquisitionHooks.
func (s *Stage) StopAcquisition() error {
	if s.active() {
		s.hook(C.EPHYS_HOOK_STOP_ACQ, "", "stop_acquisition")
	}
	s.acquiring = false
	C.ephys_stage_set_accepting(s.c, 0)
	C.ephys_stage_events_reset(s.c)
	return nil
}

// StartRecording implements pipeline.RecordingHooks; the script gets the
// full path of the session folder.
func (s *Stage) StartRecording(r *pipeline.Recording) error {
	s.recording = r
	if s.active() {
		s.hook(C.EPHYS_HOOK_START_REC, r.Dir, "start_recording")
	}
	return nil
}

// StopRecording implements pipeline.RecordingHooks.
func (s *Stage) StopRecording() error {
	if s.active() {
		s.hook(C.EPHYS_HOOK_STOP_REC, "", "stop_recording")
	}
	s.recording = nil
	return nil
}

// Process implements pipeline.Stage: TTL and spike handlers for the block's
// events (from the source and from earlier stages), then process(data) on a
// zero-copy view of the block, then the events the script queued.
func (s *Stage) Process(b *pipeline.Block) error {
	if !s.active() {
		return nil
	}
	for i := range b.Events {
		e := &b.Events[i]
		if e.Kind != pipeline.EventTTL || e.Processor == s.cfg.ID {
			continue
		}
		st := 0
		if e.State {
			st = 1
		}
		rc := C.ephys_stage_ttl(s.c, C.int(e.Processor), C.int(e.Line), C.int(st), C.int64_t(e.SampleNumber))
		if rc == 2 {
			break // no handle_ttl_event
		}
		if rc == 1 {
			s.raised("handle_ttl_event", b.FirstSample)
			if !s.active() {
				return nil
			}
		}
	}
	for i := range b.Spikes {
		sp := &b.Spikes[i]
		if len(sp.Waveform) == 0 {
			continue
		}
		el := C.CString(sp.Electrode)
		rc := C.ephys_stage_spike(s.c, C.int(sp.Processor), el, C.int(sp.Channels), C.int(sp.Samples),
			C.int64_t(sp.SampleNumber), C.int(sp.SortedID), (*C.float)(unsafe.Pointer(&sp.Waveform[0])))
		C.free(unsafe.Pointer(el))
		if rc == 2 {
			break
		}
		if rc == 1 {
			s.raised("handle_spike", b.FirstSample)
			if !s.active() {
				return nil
			}
		}
	}

	n := b.Channels * b.Samples
	if cap(s.backup) < n {
		s.backup = make([]float32, n)
	}
	s.backup = s.backup[:n]
	copy(s.backup, b.Data[:n])
	rc := C.ephys_stage_process(s.c, (*C.float)(unsafe.Pointer(&b.Data[0])), C.int(b.Channels), C.int(b.Samples),
		C.int64_t(b.FirstSample))
	if rc&C.EPHYS_RETAINED != 0 {
		rc &^= C.EPHYS_RETAINED
		s.mu.Lock()
		s.retained = true
		s.mu.Unlock()
	}
	switch rc {
	case 0:
		s.emit(b)
	case 1:
		copy(b.Data[:n], s.backup)
		C.ephys_stage_events_reset(s.c)
		s.raised("process", b.FirstSample)
	case -1:
		panic("pyrt: Process called off the interpreter thread; run the pipeline with the Runtime as its Executor")
	}
	return nil
}

// emit moves the events queued by add_python_event into the block.
func (s *Stage) emit(b *pipeline.Block) {
	n := C.ephys_stage_nevents(s.c)
	dropped := C.ephys_stage_dropped(s.c)
	if n > 0 {
		p := C.ephys_stage_events(s.c)
		events := unsafe.Slice((*C.ephys_out_event)(unsafe.Pointer(p)), int(n))
		for _, e := range events {
			line := uint8(e.line)
			on := e.state != 0
			if line < 64 {
				if on {
					s.word |= 1 << line
				} else {
					s.word &^= 1 << line
				}
			}
			sn := int64(e.sample)
			if sn < 0 {
				sn = b.FirstSample
			}
			b.Events = append(b.Events, pipeline.Event{
				Kind: pipeline.EventTTL, Processor: s.cfg.ID, Line: line, State: on,
				SampleNumber: sn, FullWord: s.word,
			})
		}
	}
	if dropped > 0 {
		if ok, more := s.droppedLog.Allow(time.Now()); ok {
			s.log.Warn("add_python_event: too many events in one block, the rest were dropped",
				zap.Int("kept", int(n)), zap.Int64("dropped", int64(dropped)), zap.Int("more_not_logged", more))
		}
	}
	C.ephys_stage_events_reset(s.c)
}

// SameModule reports whether cfg describes this stage: same id, module
// file, name and error policy (the stream's shape aside).
func (s *Stage) SameModule(cfg StageConfig) bool {
	abs, err := filepath.Abs(cfg.Path)
	if err != nil {
		return false
	}
	name := cfg.Name
	if name == "" {
		name = strings.TrimSuffix(filepath.Base(abs), ".py")
	}
	onErr := cfg.OnError
	if onErr == "" {
		onErr = OnErrorContinue
	}
	return cfg.ID == s.cfg.ID && abs == s.cfg.Path && name == s.name && onErr == s.cfg.OnError
}

// Reshape gives the stage a stream of another channel count or rate: like
// Open Ephys, it makes a new instance (__init__ with the new values). Not
// while a pipeline runs the stage.
func (s *Stage) Reshape(channels int, rate float64) error {
	if channels == s.cfg.Channels && rate == s.cfg.SampleRate {
		return nil
	}
	s.cfg.Channels, s.cfg.SampleRate = channels, rate
	return s.Reload()
}

// SetModule points the stage at another module file and loads it (the
// control API's module parameter). On failure the previous module keeps
// running.
func (s *Stage) SetModule(path string) error {
	abs, err := filepath.Abs(path)
	if err != nil {
		return err
	}
	if fi, err := os.Stat(abs); err != nil || fi.IsDir() {
		return fmt.Errorf("python module %s: no such file", abs)
	}
	old := s.cfg.Path
	s.cfg.Path = abs
	if err := s.Reload(); err != nil {
		s.cfg.Path = old
		return err
	}
	return nil
}
