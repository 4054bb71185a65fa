// Package pyrt embeds CPython in ephysd and runs Open Ephys Python Processor
// scripts as pipeline stages.
//
// It is the one place where Go meets Python. The C side (ephys_py.c) holds
// every PyObject; Go holds opaque stage handles. All per-block calls run on
// one OS thread, locked with runtime.LockOSThread, that keeps a persistent
// Python thread state and takes the GIL only for the length of each call.
// The pipeline's stage loop runs on that thread (Runtime implements
// pipeline.Executor), so a block goes to Python without a goroutine hand-off.
//
// Python is initialised once per process (numpy cannot be re-imported after
// Py_Finalize), with signal handlers off and in isolated mode, from an
// interpreter chosen explicitly (ResolveInterpreter): PATH and PYTHON*
// variables are never consulted.
package pyrt

/*
// libpython is linked statically, as Debian links /usr/bin/python3.11: its
// static library is built with the same optimisations (PGO, LTO, no PIC),
// and measured 9% faster on scipy/numpy code than libpython3.11.so
// (ephysd bench python). --export-dynamic lets extension modules (numpy)
// find the Python symbols in the executable, as they do in python3.11.
// The paths are Debian 12's libpython3.11-dev (make installs it); pkg-config
// python3-embed would link the shared library.
#cgo CFLAGS: -I/usr/include/python3.11
#cgo LDFLAGS: /usr/lib/python3.11/config-3.11-x86_64-linux-gnu/libpython3.11.a -lexpat -lz -lm -ldl -Wl,--export-dynamic
#include <stdlib.h>
#include "ephys_py.h"
*/
import "C"

import (
	"errors"
	"fmt"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"go.uber.org/zap"
)

// Config chooses the interpreter.
type Config struct {
	// Executable is a Python executable (absolute path); Venv a virtual
	// environment folder, whose site-packages then import. Both empty: the
	// Debian system Python (DefaultExecutable).
	Executable string
	Venv       string
	// SwitchInterval is Python's thread switch interval (sys.setswitchinterval).
	// A script that starts a busy Python thread delays every call by up to this
	// much. Default 100 µs.
	SwitchInterval time.Duration
	// BlockTimeout is how long one call into a stage's script (process, a
	// handler or a hook) may run before ephysd interrupts it with
	// TimeoutError; 0 means 2 s, < 0 never. See Runtime for what is
	// interrupted and what happens next. A later Start with the same
	// interpreter sets it anew.
	BlockTimeout time.Duration
	Log          *zap.Logger
}

// Runtime is the process's embedded Python.
//
// Hung scripts: a watchdog interrupts a call into a script that runs longer
// than Config.BlockTimeout. It signals the interpreter thread
// (SIGRTMIN+6, handled by CPython's own signal handler, without
// SA_RESTART), so a pure-Python loop raises TimeoutError at its next
// bytecode, and a blocking call — time.sleep, select, socket and pipe
// reads, lock and Event waits, subprocess waits, a regular expression that
// backtracks for ever — returns EINTR and raises it there. The stage then
// fails: it passes data through until reloaded (Stage).
//
// A call that is still running MaxStall after it began — C code that
// neither returns nor checks for signals (a C extension or ctypes call
// blocked in pthread_mutex_lock or pthread_join, a C loop), or a script
// that swallows every TimeoutError — is given up: the runtime is then
// Stuck for the rest of the process. Every stage passes data through, a
// pipeline running its stage loop on the interpreter thread continues on
// another goroutine (pipeline.AbandonableExecutor), calls that need the
// interpreter fail at once instead of waiting for it, and the operator
// restarts ephysd.
type Runtime struct {
	log         *zap.Logger
	interp      Interpreter
	numpy       string
	tasks       chan func()
	loops       chan func(<-chan func())
	mu          sync.Mutex
	moduleNames map[string]int // module name -> stage id

	limit atomic.Int64 // BlockTimeout in ns; <= 0: never interrupt

	stuckMu     sync.Mutex
	stuck       atomic.Bool
	stuckCh     chan struct{} // closed when the interpreter thread is given up
	abandonDone chan struct{} // closed once the runner continued elsewhere
	stuckWhy    string
	onAbandon   func() // the abandon callback of the loop on the thread
}

var (
	startMu sync.Mutex
	started *Runtime
	logger  atomic.Pointer[zap.Logger]
	// stages by id, for tagging Python output.
	stageNames sync.Map // int -> *Stage
)

// LinkedVersion is the version of the libpython ephysd is linked against.
func LinkedVersion() string { return C.GoString(C.ephys_linked_version()) }

// LinkedMinorVersion is "3.11" for libpython 3.11.x.
func LinkedMinorVersion() string { return minor(LinkedVersion()) }

// Start initialises Python in this process (once). A second call with the
// same choice of interpreter returns the running runtime; another choice is
// an error, because Python cannot be re-initialised in one process.
func Start(cfg Config) (*Runtime, error) {
	startMu.Lock()
	defer startMu.Unlock()
	in, err := ResolveInterpreter(cfg.Executable, cfg.Venv)
	if err != nil {
		return nil, err
	}
	if started != nil {
		if started.interp.Executable != in.Executable {
			return nil, fmt.Errorf("python: this process already runs %s; restart ephysd to switch to %s", started.interp.Executable, in.Executable)
		}
		started.setLimit(cfg.BlockTimeout)
		return started, nil
	}
	if cfg.SwitchInterval <= 0 {
		cfg.SwitchInterval = 100 * time.Microsecond
	}
	if cfg.Log == nil {
		cfg.Log = zap.NewNop()
	}
	logger.Store(cfg.Log)
	rt := &Runtime{
		log:         cfg.Log,
		interp:      in,
		tasks:       make(chan func()),
		loops:       make(chan func(<-chan func())),
		moduleNames: map[string]int{},
		stuckCh:     make(chan struct{}),
		abandonDone: make(chan struct{}),
	}
	rt.setLimit(cfg.BlockTimeout)
	ready := make(chan error, 1)
	go rt.thread(cfg, ready)
	if err := <-ready; err != nil {
		return nil, err
	}
	go rt.watchdog()
	started = rt
	return rt, nil
}

func (rt *Runtime) thread(cfg Config, ready chan<- error) {
	runtime.LockOSThread() // never unlocked: this thread owns the interpreter's main thread state
	program := C.CString(rt.interp.Executable)
	check := C.CString(fmt.Sprintf("Python %s at %s", rt.interp.Version, rt.interp.Prefix))
	var cerr *C.char
	rc := C.ephys_init(program, check, C.double(cfg.SwitchInterval.Seconds()), &cerr)
	C.free(unsafe.Pointer(program))
	C.free(unsafe.Pointer(check))
	if rc != 0 {
		msg := C.GoString(cerr)
		C.free(unsafe.Pointer(cerr))
		hint := ""
		if rc == -2 {
			hint = " — install python3-numpy (make run does), or choose a venv that has numpy"
		}
		ready <- fmt.Errorf("python %s: %s%s", rt.interp.Executable, msg, hint)
		if rc == -1 {
			return
		}
		// Python is up but unusable for stages; keep serving so nothing hangs.
	} else {
		info := C.ephys_sys_info()
		parts := strings.Split(C.GoString(info), "\n")
		C.free(unsafe.Pointer(info))
		if len(parts) == 4 {
			if parts[0] != rt.interp.Prefix {
				ready <- fmt.Errorf("python %s: the embedded interpreter found sys.prefix %s, but the executable reports %s; its standard library would not match", rt.interp.Executable, parts[0], rt.interp.Prefix)
				return
			}
			rt.numpy = parts[3]
		}
		rt.log.Info("python started", zap.String("executable", rt.interp.Executable),
			zap.String("version", rt.interp.Version), zap.String("prefix", rt.interp.Prefix),
			zap.String("numpy", rt.numpy), zap.String("linked", LinkedVersion()))
		ready <- nil
	}
	for {
		select {
		case f := <-rt.tasks:
			f()
		case loop := <-rt.loops:
			loop(rt.tasks)
		}
	}
}

// DefaultBlockTimeout is Config.BlockTimeout's default.
const DefaultBlockTimeout = 2 * time.Second

func (rt *Runtime) setLimit(d time.Duration) {
	if d == 0 {
		d = DefaultBlockTimeout
	}
	rt.limit.Store(int64(d))
}

// BlockTimeout is the limit in force (< 0: never).
func (rt *Runtime) BlockTimeout() time.Duration { return time.Duration(rt.limit.Load()) }

// watchTick is how often the watchdog looks at the call in progress: a
// call is interrupted between limit and limit + watchTick after it began.
func watchTick(limit time.Duration) time.Duration {
	return min(max(limit/20, 5*time.Millisecond), 100*time.Millisecond)
}

// giveUpAfter is how long after the interruption the watchdog waits for a
// call before giving up the interpreter thread: long enough that a busy
// machine never makes it give up a call that is returning.
func giveUpAfter(limit time.Duration) time.Duration {
	return min(max(limit/2, time.Second), 5*time.Second)
}

// MaxStall is the longest one call into a script can hold up the stage
// thread with this BlockTimeout: the limit, the watchdog's resolution, and
// the time it waits after interrupting before it gives up the thread. A
// pipeline whose queue before the stages holds this much more loses no
// block to a hung script. 0 if calls are never interrupted (limit < 0).
func MaxStall(limit time.Duration) time.Duration {
	if limit == 0 {
		limit = DefaultBlockTimeout
	}
	if limit < 0 {
		return 0
	}
	return limit + giveUpAfter(limit) + 2*watchTick(limit)
}

// watchdog interrupts calls into scripts that run past the limit, again
// every watch tick while they keep running, and gives up the interpreter
// thread if one is still running giveUpAfter the first interruption.
func (rt *Runtime) watchdog() {
	var seen int64 = -1
	var since, interrupted time.Time
	for {
		limit := rt.BlockTimeout()
		tick := watchTick(limit)
		if limit < 0 {
			tick = 100 * time.Millisecond
		}
		time.Sleep(tick)
		now := time.Now()
		id, status, stage, what := currentCall()
		if status == 0 {
			seen = -1
			continue
		}
		if id != seen {
			seen, since, interrupted = id, now, time.Time{}
			continue
		}
		if rt.stuck.Load() {
			// Given up, but keep interrupting: a script that swallows a
			// few TimeoutErrors frees the CPU once it lets one through.
			if now.Sub(interrupted) >= time.Second {
				interrupted = now
				rt.interrupt(id, "")
			}
			continue
		}
		running := now.Sub(since)
		if limit < 0 || running < limit {
			continue
		}
		name := stageName(stage)
		call := what
		if interrupted.IsZero() {
			interrupted = now
			rt.log.Warn("python stage is stuck in one call; interrupting it with TimeoutError",
				zap.String("stage", name), zap.String("in", call), zap.Duration("running_for", running.Round(time.Millisecond)),
				zap.Duration("limit", limit))
			rt.interrupt(id, fmt.Sprintf("ephysd: %s() of stage %s ran longer than %s (python.block_timeout_ms) and was interrupted",
				call, name, limit))
			continue
		}
		if now.Sub(interrupted) < giveUpAfter(limit) {
			rt.interrupt(id, "")
			continue
		}
		if C.ephys_abandon(C.int64_t(id)) == 1 {
			rt.giveUp(name, call, running)
		}
	}
}

// currentCall is the latest call into a script: its id, state (0 ended, 1
// running, 2 given up), stage id and what it calls.
func currentCall() (id int64, status int, stage int, what string) {
	var cstatus, cstage C.int
	var cwhat *C.char
	cid := C.ephys_call_state(&cstatus, &cstage, &cwhat)
	if cwhat != nil {
		what = C.GoString(cwhat)
	}
	return int64(cid), int(cstatus), int(cstage), what
}

// interrupt signals call id to raise TimeoutError(msg) (msg is used by
// the first interruption of a call).
func (rt *Runtime) interrupt(id int64, msg string) bool {
	cs := C.CString(msg)
	defer C.free(unsafe.Pointer(cs))
	return C.ephys_interrupt(C.int64_t(id), cs) == 1
}

func stageName(id int) string {
	if v, ok := stageNames.Load(id); ok {
		return v.(*Stage).name
	}
	return fmt.Sprint(id)
}

// giveUp marks the runtime stuck, lets the pipeline on the thread continue
// elsewhere, and then lets the stuck call, if it ever returns, go back to
// that pipeline (which finds itself replaced).
func (rt *Runtime) giveUp(name, call string, running time.Duration) {
	rt.stuckMu.Lock()
	rt.stuckWhy = fmt.Sprintf("the Python interpreter is stuck in %s() of stage %s: it did not return within %s of being interrupted; every Python stage passes data through — restart ephysd to run them again",
		call, name, giveUpAfter(rt.BlockTimeout()))
	rt.stuck.Store(true)
	close(rt.stuckCh)
	abandon := rt.onAbandon
	rt.onAbandon = nil
	rt.stuckMu.Unlock()
	rt.log.Error("python stage does not return after being interrupted: ephysd no longer waits for the Python interpreter; "+
		"every Python stage passes data through unchanged until ephysd is restarted (the block it holds is lost, counted as an overrun)",
		zap.String("stage", name), zap.String("in", call), zap.Duration("running_for", running.Round(time.Millisecond)),
		zap.String("fix", "find out why "+call+"() blocks in C code (a C extension, ctypes), fix it, then restart ephysd (systemctl restart ephysd)"))
	if abandon != nil {
		abandon()
	}
	close(rt.abandonDone)
}

// Stuck reports whether the interpreter thread was given up (see Runtime)
// and why.
func (rt *Runtime) Stuck() (bool, string) {
	if !rt.stuck.Load() {
		return false, ""
	}
	rt.stuckMu.Lock()
	defer rt.stuckMu.Unlock()
	return true, rt.stuckWhy
}

// errStuck is the error of anything that needs the interpreter once it is
// stuck.
func (rt *Runtime) errStuck() error {
	_, why := rt.Stuck()
	return errors.New(why)
}

// Interpreter describes the Python in use.
func (rt *Runtime) Interpreter() Interpreter { return rt.interp }

// NumpyVersion is the version of numpy the interpreter imported.
func (rt *Runtime) NumpyVersion() string { return rt.numpy }

// Do runs fn on the interpreter thread and waits for it. While a pipeline
// runs its stage loop there, fn runs between two blocks. Once the runtime
// is Stuck, fn does not run (or is no longer waited for).
func (rt *Runtime) Do(fn func()) { _ = rt.do(fn) }

func (rt *Runtime) do(fn func()) error {
	if rt.stuck.Load() {
		return rt.errStuck()
	}
	done := make(chan struct{})
	select {
	case rt.tasks <- func() { fn(); close(done) }:
	case <-rt.stuckCh:
		return rt.errStuck()
	}
	select {
	case <-done:
		return nil
	case <-rt.stuckCh:
		return rt.errStuck()
	}
}

// Execute runs a pipeline stage loop on the interpreter thread
// (pipeline.Executor); on a new goroutine once the runtime is Stuck.
func (rt *Runtime) Execute(loop func(tasks <-chan func())) { rt.ExecuteAbandonable(loop, nil) }

// ExecuteAbandonable is Execute, and calls abandon if the interpreter
// thread is given up while loop runs there
// (pipeline.AbandonableExecutor).
func (rt *Runtime) ExecuteAbandonable(loop func(tasks <-chan func()), abandon func()) {
	run := func(tasks <-chan func()) {
		rt.stuckMu.Lock()
		rt.onAbandon = abandon
		rt.stuckMu.Unlock()
		loop(tasks)
		rt.stuckMu.Lock()
		rt.onAbandon = nil
		rt.stuckMu.Unlock()
	}
	if !rt.stuck.Load() {
		select {
		case rt.loops <- run:
			return
		case <-rt.stuckCh:
		}
	}
	go loop(nil)
}

// RunString runs Python source in a fresh namespace (diagnostics, tests).
func (rt *Runtime) RunString(src string) error {
	if rt.stuck.Load() {
		return rt.errStuck()
	}
	cs := C.CString(src)
	defer C.free(unsafe.Pointer(cs))
	var cerr *C.char
	if C.ephys_run_string(cs, &cerr) != 0 {
		defer C.free(unsafe.Pointer(cerr))
		return fmt.Errorf("python: %s", C.GoString(cerr))
	}
	return nil
}

// RegisterEventChannel names the event channel of a processor, as passed to
// handle_ttl_event's channel argument.
func (rt *Runtime) RegisterEventChannel(processorID int, name string) {
	if rt.stuck.Load() {
		return // the channel name only matters to scripts, which no longer run
	}
	cs := C.CString(name)
	C.ephys_register_channel(C.int(processorID), cs)
	C.free(unsafe.Pointer(cs))
}

//export goPyrtLog
func goPyrtLog(stageID C.int, stream C.int, text *C.char, n C.int) {
	line := C.GoStringN(text, n)
	log := logger.Load()
	if log == nil {
		log = zap.NewNop()
	}
	name := "python"
	if v, ok := stageNames.Load(int(stageID)); ok {
		name = v.(*Stage).name
	}
	if stream == 2 {
		log.Warn(line, zap.String("stage", name), zap.String("stream", "stderr"))
	} else {
		log.Info(line, zap.String("stage", name), zap.String("stream", "stdout"))
	}
}
