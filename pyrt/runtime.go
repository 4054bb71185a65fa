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
	// BlockTimeout is how long one per-block call (process or a handler)
	// may run before ephysd raises TimeoutError in it; 0 means 2 s, < 0
	// never. A pure-Python loop is interrupted; code blocked inside C (a
	// sleep, a read) is interrupted when it returns to Python.
	BlockTimeout time.Duration
	Log          *zap.Logger
}

// Runtime is the process's embedded Python.
type Runtime struct {
	log         *zap.Logger
	interp      Interpreter
	numpy       string
	tasks       chan func()
	loops       chan func(<-chan func())
	mu          sync.Mutex
	moduleNames map[string]int // module name -> stage id
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
	}
	ready := make(chan error, 1)
	go rt.thread(cfg, ready)
	if err := <-ready; err != nil {
		return nil, err
	}
	if cfg.BlockTimeout == 0 {
		cfg.BlockTimeout = 2 * time.Second
	}
	if cfg.BlockTimeout > 0 {
		go rt.watchdog(cfg.BlockTimeout)
	}
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

// watchdog raises TimeoutError in a per-block Python call that has run
// longer than limit, once per call.
func (rt *Runtime) watchdog(limit time.Duration) {
	tick := limit / 4
	if tick < 10*time.Millisecond {
		tick = 10 * time.Millisecond
	}
	var seen, interrupted C.int64_t = -1, -1
	var since time.Time
	for now := range time.Tick(tick) {
		var active, stage C.int
		id := C.ephys_call_state(&active, &stage)
		if active == 0 {
			seen = -1
			continue
		}
		if id != seen {
			seen, since = id, now
			continue
		}
		if id == interrupted || now.Sub(since) < limit {
			continue
		}
		name := fmt.Sprint(int(stage))
		if v, ok := stageNames.Load(int(stage)); ok {
			name = v.(*Stage).name
		}
		rt.log.Warn("python stage is stuck in one call; raising TimeoutError in it (blocks meanwhile are dropped as overruns)",
			zap.String("stage", name), zap.Duration("running_for", now.Sub(since)), zap.Duration("limit", limit))
		interrupted = id
		C.ephys_interrupt(id)
	}
}

// Interpreter describes the Python in use.
func (rt *Runtime) Interpreter() Interpreter { return rt.interp }

// NumpyVersion is the version of numpy the interpreter imported.
func (rt *Runtime) NumpyVersion() string { return rt.numpy }

// Do runs fn on the interpreter thread and waits for it. While a pipeline
// runs its stage loop there, fn runs between two blocks.
func (rt *Runtime) Do(fn func()) {
	done := make(chan struct{})
	rt.tasks <- func() { fn(); close(done) }
	<-done
}

// Execute runs a pipeline stage loop on the interpreter thread
// (pipeline.Executor).
func (rt *Runtime) Execute(loop func(tasks <-chan func())) { rt.loops <- loop }

// RunString runs Python source in a fresh namespace (diagnostics, tests).
func (rt *Runtime) RunString(src string) error {
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
