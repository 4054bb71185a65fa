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
	ID   int
	Name string
	Path string
	// State is "running"; "failed": its last call raised and it is still
	// called (on_error = "continue"), or it timed out or the interpreter is
	// stuck and it passes data through; "disabled": it raised with
	// on_error = "disable"; "not loaded".
	State     string
	Errors    uint64 // exceptions raised so far (a timeout is one)
	LastError string // the last exception's last line, or why the stage passes data through
	Retained  bool   // the script keeps a reference to a data array
	// Timeouts counts calls the watchdog interrupted (python.block_timeout_ms).
	Timeouts uint64
	// PassThrough: Python is not called, blocks pass on unchanged, until a
	// reload (or, when the interpreter is stuck, a restart of ephysd).
	PassThrough bool
	// Worker describes the worker process of a stage isolated in a process
	// of its own (pyrt/isolated); nil for a stage in ephysd's interpreter.
	Worker *WorkerStatus `json:",omitempty"`
}

// WorkerStatus is the state of an isolated stage's worker process.
type WorkerStatus struct {
	PID      int    // 0 while the worker is down or starting
	Restarts uint64 // workers started after the first
	LastExit string // how the last worker ended ("killed by signal SIGSEGV"), "" if none has
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
	timedOut   bool // a call ran past the block timeout: pass-through until reload
	timeouts   uint64
	errors     uint64
	lastError  string
	loggedFull bool
	retained   bool

	errLog     pipeline.LogLimiter
	droppedLog pipeline.LogLimiter
	spikes     stageSpikes // add_python_spike (spikes.go)

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

	if rt.stuck.Load() {
		return nil, fmt.Errorf("python module %s: %w", abs, rt.errStuck())
	}
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

// load imports the module and makes an instance (on a goroutine of its
// own, which takes the GIL). It does not wait for a stuck interpreter.
func (s *Stage) load() error {
	if s.rt.stuck.Load() {
		return s.rt.errStuck()
	}
	done := make(chan error, 1)
	go func() { done <- s.loadNow() }()
	select {
	case err := <-done:
		return err
	case <-s.rt.stuckCh:
		return s.rt.errStuck()
	}
}

func (s *Stage) loadNow() error {
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
		res := make(chan error, 1)
		if err = s.rt.do(func() { res <- s.commit() }); err == nil {
			err = <-res
		}
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
	s.timedOut = false
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
// old one keeps running and the error is returned. A stage that failed
// (timed out, disabled) runs again after a successful reload; an old
// instance that timed out gets no stop hooks.
func (s *Stage) Reload() error {
	err := s.load()
	if err == nil {
		res := make(chan error, 1)
		err = s.rt.do(func() {
			s.mu.Lock()
			hung := s.timedOut
			s.mu.Unlock()
			if s.recording != nil && !hung {
				s.hook(C.EPHYS_HOOK_STOP_REC, "", "stop_recording")
			}
			if s.acquiring && !hung {
				s.hook(C.EPHYS_HOOK_STOP_ACQ, "", "stop_acquisition")
			}
			if err := s.commit(); err != nil {
				res <- err
				return
			}
			s.mu.Lock()
			s.loaded, s.disabled, s.failedNow, s.timedOut, s.loggedFull = true, false, false, false, false
			s.mu.Unlock()
			if s.acquiring {
				s.hook(C.EPHYS_HOOK_START_ACQ, "", "start_acquisition")
			}
			if s.recording != nil {
				s.hook(C.EPHYS_HOOK_START_REC, s.recording.Dir, "start_recording")
			}
			res <- nil
		})
		if err == nil {
			err = <-res
		}
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
// Once the interpreter is stuck, it may still write to the block it holds.
func (s *Stage) Retained() bool {
	if s.rt.stuck.Load() {
		return true
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.retained
}

// Status reports the stage's state.
func (s *Stage) Status() StageStatus {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := StageStatus{ID: s.cfg.ID, Name: s.name, Path: s.cfg.Path, Errors: s.errors, LastError: s.lastError, Retained: s.retained,
		Timeouts: s.timeouts, PassThrough: !s.loaded || s.disabled || s.timedOut}
	stuck, why := s.rt.Stuck()
	switch {
	case stuck:
		st.State, st.LastError, st.PassThrough, st.Retained = "failed", why, true, true
	case !s.loaded:
		st.State = "not loaded"
	case s.timedOut:
		st.State = "failed"
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
	if s.rt.stuck.Load() {
		return false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.loaded && !s.disabled && !s.timedOut
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
	if s.rt.stuck.Load() {
		return
	}
	var carg *C.char
	if which == C.EPHYS_HOOK_START_REC {
		carg = C.CString(arg)
		defer C.free(unsafe.Pointer(carg))
	}
	rc, end := s.ended(C.ephys_stage_hook(s.c, which, carg), name, -1)
	if end != callReturned {
		return
	}
	switch rc {
	case 1:
		s.raised(name, -1)
	case -1:
		panic("pyrt: " + name + " called off the interpreter thread")
	}
}

// callEnd is how a call into the script ended.
type callEnd int

const (
	callReturned  callEnd = iota // by itself, in time (it may have raised)
	callTimedOut                 // the watchdog interrupted it: the stage has failed
	callAbandoned                // the watchdog gave up on it: the runtime is stuck
)

// ended interprets what a call into the script returned: its result (0,
// 1 raised, 2 no such member, -1 wrong thread) without flags, and how it
// ended. A call that timed out makes the stage fail: it passes data
// through until reloaded, and what the call queued is dropped. A call
// the watchdog gave up on waits until the pipeline has moved on without
// it, then touches nothing.
func (s *Stage) ended(rc C.int, where string, firstSample int64) (int, callEnd) {
	if rc < 0 {
		return -1, callReturned
	}
	code := int(rc &^ (C.EPHYS_RETAINED | C.EPHYS_TIMED_OUT | C.EPHYS_ABANDONED))
	switch {
	case rc&C.EPHYS_ABANDONED != 0:
		<-s.rt.abandonDone
		s.log.Warn("the python call ephysd had given up on has returned; Python stays off until ephysd is restarted",
			zap.String("in", where))
		return code, callAbandoned
	case rc&C.EPHYS_TIMED_OUT != 0:
		s.timedOutIn(where, firstSample, code == 1)
		return code, callTimedOut
	}
	return code, callReturned
}

// timedOutIn fails the stage after the watchdog interrupted a call.
func (s *Stage) timedOutIn(where string, firstSample int64, raised bool) {
	text := "(it caught the TimeoutError and returned late)"
	if raised {
		text = s.takeError(1) // where it was stuck
	}
	C.ephys_stage_events_reset(s.c)
	limit := s.rt.BlockTimeout()
	s.mu.Lock()
	s.errors++
	s.timeouts++
	s.timedOut, s.failedNow = true, true
	s.lastError = fmt.Sprintf("TimeoutError: %s() ran longer than %s (python.block_timeout_ms); the stage passes data through until it is reloaded",
		where, limit)
	s.mu.Unlock()
	s.log.Error("python stage timed out: the call was interrupted, and the stage passes data through unchanged until it is reloaded (ephysd reload, SIGHUP)",
		zap.String("in", where), zap.Int64("first_sample", firstSample), zap.Duration("limit", limit), zap.String("traceback", text))
}

// StartAcquisition implements pipeline.AcquisitionHooks.
func (s *Stage) StartAcquisition() error {
	s.acquiring = true
	if s.rt.stuck.Load() {
		return nil
	}
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
	if n := s.errLog.Pending(); n > 0 {
		s.log.Warn("python stage raised more times than were logged", zap.Int("count", n))
	}
	if s.rt.stuck.Load() {
		return nil
	}
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
// events and spikes (from the source and from earlier stages, not this
// stage's own), then process(data) on a zero-copy view of the block, then
// the events and spikes the script queued (add_python_event,
// add_python_spike).
func (s *Stage) Process(b *pipeline.Block) error {
	if !s.active() {
		return nil
	}
	s.beginSpikes(b)
	defer s.endSpikes(b)
	for i := range b.Events {
		e := &b.Events[i]
		if e.Kind != pipeline.EventTTL || e.Processor == s.cfg.ID {
			continue
		}
		st := 0
		if e.State {
			st = 1
		}
		rc, end := s.ended(C.ephys_stage_ttl(s.c, C.int(e.Processor), C.int(e.Line), C.int(st), C.int64_t(e.SampleNumber)),
			"handle_ttl_event", b.FirstSample)
		if end != callReturned {
			return nil // the block passes on unchanged
		}
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
		if len(sp.Waveform) == 0 || sp.Processor == s.cfg.ID {
			continue
		}
		el := C.CString(sp.Electrode)
		rc, end := s.ended(C.ephys_stage_spike(s.c, C.int(sp.Processor), el, C.int(sp.Channels), C.int(sp.Samples),
			C.int64_t(sp.SampleNumber), C.int(sp.SortedID), (*C.float)(unsafe.Pointer(&sp.Waveform[0]))),
			"handle_spike", b.FirstSample)
		C.free(unsafe.Pointer(el))
		if end != callReturned {
			return nil
		}
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
	crc := C.ephys_stage_process(s.c, (*C.float)(unsafe.Pointer(&b.Data[0])), C.int(b.Channels), C.int(b.Samples),
		C.int64_t(b.FirstSample))
	if crc&C.EPHYS_RETAINED != 0 {
		s.mu.Lock()
		s.retained = true
		s.mu.Unlock()
	}
	rc, end := s.ended(crc, "process", b.FirstSample)
	switch end {
	case callAbandoned:
		return nil // the runner has dropped this block and moved on
	case callTimedOut:
		copy(b.Data[:n], s.backup)
		return nil
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

// emit moves the events queued by add_python_event, then the spikes queued
// by add_python_spike, into the block.
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
	s.emitSpikes(b)
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
