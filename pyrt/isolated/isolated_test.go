package isolated

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/ephysd/ephysd/pipeline"
	"github.com/ephysd/ephysd/pyrt"
)

// apiModule uses every member of the Open Ephys Python Processor API and
// writes each call, with its arguments, to <module>.log.
const apiModule = `
import numpy as np
import oe_pyprocessor

LOG = __file__ + ".log"

def log(*a):
    with open(LOG, "a") as f:
        f.write(repr(a) + "\n")

class PyProcessor:
    def __init__(self, processor, num_channels, sample_rate):
        assert isinstance(processor, oe_pyprocessor.PythonProcessor), type(processor)
        self.processor = processor
        self.blocks = 0
        log("init", num_channels, sample_rate)

    def start_acquisition(self):
        log("start_acquisition")

    def stop_acquisition(self):
        log("stop_acquisition")

    def start_recording(self, recording_dir):
        log("start_recording", recording_dir)

    def stop_recording(self):
        log("stop_recording")

    def handle_ttl_event(self, source_node, channel, sample_number, line, state):
        log("ttl", source_node, channel, sample_number, line, state, self.blocks)

    def handle_spike(self, source_node, electrode_name, num_channels, num_samples, sample_number, sorted_id, spike_data):
        assert spike_data.dtype == np.float32 and spike_data.shape == (num_channels, num_samples)
        log("spike", source_node, electrode_name, num_channels, num_samples, sample_number, sorted_id, spike_data.tolist())
        self.processor.add_python_spike(electrode_name, sample_number, sorted_id + 10)  # relabel: the same waveform

    def process(self, data):
        assert data.dtype == np.float32 and data.flags["C_CONTIGUOUS"] and data.flags["WRITEABLE"]
        log("process", self.processor.sample_number, data.shape, float(data.sum()))
        data *= 2
        data[1] = 0
        if self.blocks == 0:
            self.processor.add_python_event(3, True)
            oe_pyprocessor.add_python_event(4, True)
        if self.blocks == 1:
            self.processor.add_python_event(3, False, sample_number=self.processor.sample_number + 7)
        if self.blocks == 2:
            print("block two", self.processor.sample_number)
        if self.blocks == 3:
            self.processor.add_python_spike("Python electrode", self.processor.sample_number + 2, 5,
                                            waveform=np.arange(8, dtype=np.float32).reshape(2, 4))
        self.blocks += 1
        return 12345
`

// An isolated stage behaves like the in-process one: the same module over
// the same blocks gives the same samples, events and spikes, and the
// script sees the same calls, in the same order, with the same arguments.
func TestSameAsInProcess(t *testing.T) {
	src := apiModule
	inPath := writeModule(t, "", "api_module.py", src)
	isoPath := writeModule(t, "", "api_module.py", src)
	const channels, samples, blocks = 3, 20, 6
	rec := &pipeline.Recording{Dir: "/tmp/session dir", Experiment: 1, Number: 1}

	inID := newID()
	in, err := testRT.NewStage(pyrt.StageConfig{ID: inID, Name: fmt.Sprintf("in#%d", inID), Path: inPath, Channels: channels, SampleRate: 30000})
	if err != nil {
		t.Fatal(err)
	}
	testRT.RegisterEventChannel(100, "TTL Input")
	want, _ := runPipeline(t, runOptions{channels: channels, samples: samples, executor: testRT, recording: rec,
		source: &testSource{blocks: blocks, spikes: true}}, in)

	iso := newIsolated(t, isoPath, channels, nil)
	iso.RegisterEventChannel(100, "TTL Input")
	got, _ := runPipeline(t, runOptions{channels: channels, samples: samples, recording: rec,
		source: &testSource{blocks: blocks, spikes: true}}, iso)

	if st := iso.Status(); st.State != "running" || st.Errors != 0 || st.Worker == nil || st.Worker.PID == 0 {
		t.Fatalf("status %+v", st)
	}
	if !reflect.DeepEqual(got.data, want.data) || !reflect.DeepEqual(got.first, want.first) {
		t.Fatalf("samples differ:\nisolated %v\nin process %v", got.data, want.data)
	}
	norm := func(evs [][]pipeline.Event, id int) [][]pipeline.Event {
		out := make([][]pipeline.Event, len(evs))
		for i, es := range evs {
			for _, e := range es {
				if e.Processor == id {
					e.Processor = -1
				}
				out[i] = append(out[i], e)
			}
		}
		return out
	}
	if g, w := norm(got.events, iso.ID()), norm(want.events, inID); !reflect.DeepEqual(g, w) {
		t.Fatalf("events differ:\nisolated %+v\nin process %+v", g, w)
	}
	var py int
	for _, es := range got.events {
		for _, e := range es {
			if e.Processor == iso.ID() {
				py++
			}
		}
	}
	if py != 3 {
		t.Fatalf("%d python events, want 3: %+v", py, got.events)
	}
	normSpikes := func(sps [][]pipeline.Spike, id int) ([][]pipeline.Spike, int) {
		out, n := make([][]pipeline.Spike, len(sps)), 0
		for i, ss := range sps {
			for _, sp := range ss {
				if sp.Processor == id {
					sp.Processor = -1
					n++
				}
				out[i] = append(out[i], sp)
			}
		}
		return out, n
	}
	gs, pySpikes := normSpikes(got.spikes, iso.ID())
	ws, _ := normSpikes(want.spikes, inID)
	if !reflect.DeepEqual(gs, ws) {
		t.Fatalf("spikes differ:\nisolated %+v\nin process %+v", gs, ws)
	}
	if pySpikes != blocks+1 {
		t.Fatalf("%d spikes from the script, want %d: %+v", pySpikes, blocks+1, got.spikes)
	}
	gotCalls, err1 := os.ReadFile(isoPath + ".log")
	wantCalls, err2 := os.ReadFile(inPath + ".log")
	if err1 != nil || err2 != nil {
		t.Fatal(err1, err2)
	}
	if string(gotCalls) != string(wantCalls) {
		t.Fatalf("the script saw different calls:\nisolated:\n%s\nin process:\n%s", gotCalls, wantCalls)
	}
	for _, want := range []string{"('start_acquisition',)", "('start_recording', '/tmp/session dir')", "('ttl', 100, 'TTL Input', 5, 0, True, 0)",
		"('spike', 100, 'Tetrode 1', 2, 3, 3, 1, [[1.0, 2.0, 1.0], [-4.0, -5.0, -6.0]])", "('stop_recording',)", "('stop_acquisition',)"} {
		if !strings.Contains(string(gotCalls), want) {
			t.Errorf("the script's calls lack %s:\n%s", want, gotCalls)
		}
	}
	// print() in the worker reaches ephysd's log, tagged with the stage.
	found := false
	for _, e := range logsFor(iso.Name()) {
		if e.Message == "block two 40" && e.ContextMap()["stream"] == "stdout" {
			found = true
		}
	}
	if !found {
		t.Fatalf("the script's print did not reach the log: %+v", logsFor(iso.Name()))
	}
}

// crashModule dies, hangs or raises at the first block at or after the
// sample number written in the flag file next to it, once (it removes the
// flag), after overwriting half of the block. It adds 1 to every sample,
// and logs its calls.
const crashModule = `
import ctypes, os
import numpy as np

FLAG = os.path.join(os.path.dirname(__file__), "flag")
LOG = __file__ + ".log"

def log(*a):
    with open(LOG, "a") as f:
        f.write(repr(a) + "\n")

class PyProcessor:
    def __init__(self, processor, num_channels, sample_rate):
        self.processor = processor
        log("init", os.getpid())
    def start_acquisition(self):
        log("start_acquisition")
    def stop_acquisition(self):
        log("stop_acquisition")
    def start_recording(self, recording_dir):
        log("start_recording", recording_dir)
    def stop_recording(self):
        log("stop_recording")
    def process(self, data):
        sn = self.processor.sample_number
        if os.path.exists(FLAG):
            how, at = open(FLAG).read().split()
            if sn >= int(at):
                os.remove(FLAG)
                log("crash", how, sn)
                data[:, : data.shape[1] // 2] = -12345.0  # half-written when it dies
                if how == "segfault":
                    ctypes.string_at(0)
                elif how == "exit":
                    os._exit(3)
                elif how == "sigkill":
                    os.kill(os.getpid(), 9)
                elif how == "hang":
                    # A deadlock in native code: no signal gets it out.
                    m = ctypes.create_string_buffer(64)
                    libc = ctypes.CDLL(None)
                    libc.pthread_mutex_lock(m)
                    libc.pthread_mutex_lock(m)
                elif how == "memoryerror":
                    np.ones(1 << 46)
        data += 1
        if sn % 300 == 0:
            self.processor.add_python_event(1, (sn // 300) % 2 == 0)
`

// stateWatcher polls a stage's status and keeps the states it saw, in order.
type stateWatcher struct {
	mu     sync.Mutex
	states []string
	stop   chan struct{}
	done   chan struct{}
}

func watchStates(s *Stage) *stateWatcher {
	w := &stateWatcher{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(w.done)
		for {
			st := s.Status().State
			w.mu.Lock()
			if n := len(w.states); n == 0 || w.states[n-1] != st {
				w.states = append(w.states, st)
			}
			w.mu.Unlock()
			select {
			case <-w.stop:
				return
			case <-time.After(5 * time.Millisecond):
			}
		}
	}()
	return w
}

func (w *stateWatcher) end() []string {
	close(w.stop)
	<-w.done
	return w.states
}

// A worker that dies — a segfault in native code, os._exit, SIGKILL (what
// the out-of-memory killer sends), a deadlock in native code that only a
// kill ends — costs no sample: while recording, every block reaches the
// consumer in order, the one the worker died on and those while it is
// down pass through unchanged, the worker is restarted, gets the hooks it
// missed, and processes the blocks after. A MemoryError is only an
// exception: no restart.
func TestWorkerDeathLosesNoSample(t *testing.T) {
	cases := []struct {
		how     string
		exit    string // in the log of the death
		restart bool
	}{
		{"segfault", "after a fatal SIGSEGV in native code", true},
		{"exit", "exited with status 3", true},
		{"sigkill", "killed by signal SIGKILL", true},
		{"hang", "killed by ephysd: no answer to process within", true},
		{"memoryerror", "", false},
	}
	for _, tc := range cases {
		t.Run(tc.how, func(t *testing.T) {
			dir := t.TempDir()
			path := writeModule(t, dir, "crashy.py", crashModule)
			const channels, samples, crashAt = 4, 30, 30 * 50
			if err := os.WriteFile(filepath.Join(dir, "flag"), []byte(fmt.Sprintf("%s %d", tc.how, crashAt)), 0o644); err != nil {
				t.Fatal(err)
			}
			s := newIsolated(t, path, channels, func(c *Config) { c.BlockTimeout = 300 * time.Millisecond })
			firstPID := s.PID()
			col := &collector{}
			// Run until the worker is back and has processed 30 blocks (or,
			// without a restart, 100 blocks past the failure).
			until := func() bool {
				col.mu.Lock()
				defer col.mu.Unlock()
				n := len(col.data)
				if n < crashAt/samples+30 {
					return false
				}
				if !tc.restart {
					return n >= crashAt/samples+100
				}
				if s.Restarts() < 1 {
					return false
				}
				for _, d := range col.data[n-30:] {
					if d[0] == inputValue(0, 0) { // cannot tell: keep going
						return false
					}
				}
				last := col.data[n-30:]
				for i, d := range last {
					if d[0] != inputValue(0, col.first[n-30+i])+1 {
						return false
					}
				}
				return true
			}
			watch := watchStates(s)
			rec := &pipeline.Recording{Dir: dir, Experiment: 1, Number: 1}
			_, stats := runPipeline(t, runOptions{channels: channels, samples: samples, recording: rec, live: true, col: col,
				source: &testSource{until: until, pace: 500 * time.Microsecond}}, s)
			states := watch.end()

			if stats.OverrunBlocks != 0 || stats.Gaps != 0 {
				t.Fatalf("blocks were lost: %+v", stats)
			}
			passed, processed := 0, 0
			for i, d := range col.data {
				if col.first[i] != int64(i*samples) {
					t.Fatalf("block %d starts at sample %d, want %d: a gap", i, col.first[i], i*samples)
				}
				for c := 0; c < channels; c++ {
					for j := 0; j < samples; j++ {
						in := inputValue(c, col.first[i]+int64(j))
						switch v := d[c*samples+j]; v {
						case in + 1:
							processed++
						case in:
							passed++
						default:
							t.Fatalf("block %d ch %d sample %d: %v is neither the input %v nor the output: a half-written block", i, c, j, v, in)
						}
					}
				}
				crashBlock := crashAt / samples
				if i < crashBlock && d[0] != inputValue(0, col.first[i])+1 {
					t.Fatalf("block %d before the failure was not processed", i)
				}
				if i == crashBlock && d[0] != inputValue(0, col.first[i]) {
					t.Fatalf("the block the worker failed on was changed: %v", d[:4])
				}
			}
			if passed == 0 {
				t.Fatal("no block passed through unchanged")
			}
			st := s.Status()
			calls, _ := os.ReadFile(path + ".log")
			if !tc.restart {
				if s.Restarts() != 0 || st.State != "failed" || st.Errors != 1 || !strings.Contains(st.LastError, "MemoryError") {
					t.Fatalf("MemoryError: status %+v, restarts %d", st, s.Restarts())
				}
				return
			}
			if s.Restarts() != 1 || s.PID() == firstPID || s.PID() == 0 {
				t.Fatalf("restarts %d, pid %d (first %d)", s.Restarts(), s.PID(), firstPID)
			}
			if st.State != "running" || st.Errors < 1 || st.Worker == nil || !strings.Contains(st.Worker.LastExit, tc.exit) {
				t.Fatalf("status after the restart %+v (worker %+v)", st, st.Worker)
			}
			if i := indexOf(states, "failed"); i < 0 || states[len(states)-1] != "running" || indexOf(states[:i], "running") < 0 {
				t.Fatalf("states seen: %v; want running, failed, …, running", states)
			}
			// The new worker was brought up to date: a second init, then
			// start_acquisition and start_recording before its first block.
			lines := strings.Split(strings.TrimSpace(string(calls)), "\n")
			inits := 0
			for i, l := range lines {
				if strings.HasPrefix(l, "('init',") {
					inits++
					if inits == 2 && (i+2 >= len(lines) || lines[i+1] != "('start_acquisition',)" || lines[i+2] != "('start_recording', '"+dir+"')") {
						t.Fatalf("the restarted worker did not get the hooks it missed:\n%s", calls)
					}
				}
			}
			if inits != 2 {
				t.Fatalf("%d inits, want 2:\n%s", inits, calls)
			}
			var died bool
			for _, e := range logsFor(s.Name()) {
				if strings.HasPrefix(e.Message, "python worker died") && strings.Contains(fmt.Sprint(e.ContextMap()["exit"]), tc.exit) {
					died = true
				}
			}
			if !died {
				t.Fatalf("no log of the death with %q", tc.exit)
			}
		})
	}
}

func indexOf(s []string, v string) int {
	for i, x := range s {
		if x == v {
			return i
		}
	}
	return -1
}

func openFDs(t testing.TB) int {
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(entries)
}

// Killing the worker again and again leaks nothing: after N deaths and
// restarts and Close, the parent has as many descriptors and goroutines as
// before, and no worker process is left.
func TestNoLeakOverRestarts(t *testing.T) {
	path := writeModule(t, "", "plain.py", `
class PyProcessor:
    def __init__(self, processor, num_channels, sample_rate):
        pass
    def process(self, data):
        data += 1
`)
	pool, err := pipeline.NewPool(1, 2, 8)
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close(false)
	b := pool.TryGet()
	defer b.Release()
	// A first stage, closed, before counting: what the Go runtime opens
	// once, lazily (the network poller), is not a leak.
	warm := newIsolated(t, path, 2, nil)
	warm.Process(b)
	warm.Close()
	runtime.GC()
	fds, goroutines := openFDs(t), runtime.NumGoroutine()
	s := newIsolated(t, path, 2, func(c *Config) { c.MinBackoff, c.MaxBackoff = 10*time.Millisecond, 20*time.Millisecond })
	var pids []int
	const cycles = 5
	for i := 0; i < cycles; i++ {
		pid := s.PID()
		waitFor(t, "a running worker", func() bool { pid = s.PID(); return pid != 0 })
		b.Data[0] = 1
		if err := s.Process(b); err != nil || b.Data[0] != 2 {
			t.Fatalf("cycle %d: the worker did not process: %v %v", i, b.Data[0], err)
		}
		pids = append(pids, pid)
		if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		waitFor(t, "the restart", func() bool { return s.Restarts() == uint64(i+1) })
	}
	waitFor(t, "a running worker", func() bool { return s.PID() != 0 })
	pids = append(pids, s.PID())
	s.Close()
	if st := s.Status(); st.Errors != cycles || st.Worker.Restarts != cycles {
		t.Fatalf("status %+v %+v", st, st.Worker)
	}
	b.Data[0] = 7
	if s.Process(b); b.Data[0] != 7 {
		t.Fatal("a closed stage changed a block")
	}
	for _, pid := range pids {
		if err := syscall.Kill(pid, 0); !errors.Is(err, syscall.ESRCH) {
			t.Fatalf("worker %d is still there (%v)", pid, err)
		}
	}
	waitFor(t, "descriptors and goroutines back to where they were", func() bool {
		runtime.GC()
		return openFDs(t) == fds && runtime.NumGoroutine() <= goroutines
	})
}

// Reload, set_module and status go to the worker; a module that fails to
// load is a *pyrt.LoadError and the previous version keeps running.
func TestReloadSetModuleAndLoadErrors(t *testing.T) {
	dir := t.TempDir()
	v := func(n int) string {
		// Each version has another length: Python's bytecode cache tells
		// files apart by size and mtime in whole seconds.
		return fmt.Sprintf("class PyProcessor:\n    def __init__(self, p, c, r):\n        pass\n    def process(self, data):\n        data += %d%s\n", n, strings.Repeat(" ", n))
	}
	path := writeModule(t, dir, "mod.py", v(1))
	s := newIsolated(t, path, 1, nil)
	pool, _ := pipeline.NewPool(1, 1, 4)
	defer pool.Close(false)
	b := pool.TryGet()
	defer b.Release()
	step := func(want float32) {
		t.Helper()
		b.Data[0] = 0
		s.Process(b)
		if b.Data[0] != want {
			t.Fatalf("got %v want %v", b.Data[0], want)
		}
	}
	step(1)
	writeModule(t, dir, "mod.py", v(2))
	if err := s.Reload(); err != nil {
		t.Fatal(err)
	}
	step(2)
	writeModule(t, dir, "mod.py", "def broken(:\n")
	err := s.Reload()
	var le *pyrt.LoadError
	if !errors.As(err, &le) || !strings.Contains(le.Traceback, "SyntaxError") {
		t.Fatalf("reload of a broken module: %v", err)
	}
	step(2)
	other := writeModule(t, dir, "other.py", v(5))
	if err := s.SetModule(other); err != nil {
		t.Fatal(err)
	}
	step(5)
	if st := s.Status(); st.Path != other || st.State != "running" || st.Errors != 1 {
		t.Fatalf("status %+v", st)
	}
	if err := s.SetModule(filepath.Join(dir, "missing.py")); err == nil {
		t.Fatal("a missing module was accepted")
	}

	// A module that does not import: the stage exists and passes through.
	bad := writeModule(t, "", "bad.py", "raise RuntimeError('no')\n")
	id := newID()
	s2, err := NewStage(Config{Stage: pyrt.StageConfig{ID: id, Name: fmt.Sprintf("bad#%d", id), Path: bad, Channels: 1, SampleRate: 30000},
		Command: workerCommand, Log: testLog})
	if s2 == nil || !errors.As(err, &le) || !strings.Contains(le.Traceback, "RuntimeError: no") {
		t.Fatalf("NewStage of a broken module: %v %v", s2, err)
	}
	defer s2.Close()
	b.Data[0] = 3
	s2.Process(b)
	if st := s2.Status(); b.Data[0] != 3 || st.State != "not loaded" {
		t.Fatalf("broken module: data %v, status %+v", b.Data[0], st)
	}
	// A missing file, or a worker that cannot start, is no stage.
	if s3, err := NewStage(Config{Stage: pyrt.StageConfig{ID: newID(), Path: filepath.Join(dir, "nope.py")}, Command: workerCommand}); s3 != nil || err == nil {
		t.Fatal("a missing module made a stage")
	}
	if s3, err := NewStage(Config{Stage: pyrt.StageConfig{ID: newID(), Path: path}, Command: workerCommand, Venv: dir}); s3 != nil ||
		err == nil || !strings.Contains(err.Error(), "pyvenv.cfg") {
		t.Fatalf("a worker with a bad venv: %v", err)
	}
}

// A block larger than the shared memory was sized for grows it, and the
// worker keeps processing.
func TestSharedMemoryGrows(t *testing.T) {
	path := writeModule(t, "", "grow.py", `
class PyProcessor:
    def __init__(self, p, c, r):
        pass
    def process(self, data):
        data *= -1
`)
	s := newIsolated(t, path, 8, func(c *Config) { c.BlockSamples = 4 })
	for _, n := range []int{4, 100, 3000, 10} {
		pool, _ := pipeline.NewPool(1, 8, n)
		b := pool.TryGet()
		for i := range b.Data {
			b.Data[i] = float32(i)
		}
		s.Process(b)
		for i, v := range b.Data {
			if v != -float32(i) {
				t.Fatalf("block of %d samples: value %d is %v", n, i, v)
			}
		}
		b.Release()
		pool.Close(false)
	}
}

// alive reports whether pid runs (a zombie does not).
func alive(pid int) bool {
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	f := strings.Fields(string(stat[strings.LastIndexByte(string(stat), ')')+1:]))
	return len(f) > 0 && f[0] != "Z" && f[0] != "X"
}

// When ephysd dies (SIGKILL: no chance to clean up), its workers end too:
// the control socket closes, and a worker exits when it does.
func TestWorkerEndsWithParent(t *testing.T) {
	path := writeModule(t, "", "orphan.py", passThrough)
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(exe)
	cmd.Env = append(os.Environ(), reexecEnv+"="+parentRole, "ISOLATED_TEST_MODULE="+path)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var pid int
	if _, err := fmt.Fscan(out, &pid); err != nil || pid <= 0 {
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatalf("the parent did not report its worker: %v", err)
	}
	if !alive(pid) {
		t.Fatalf("worker %d is not running", pid)
	}
	cmd.Process.Kill()
	cmd.Wait()
	waitFor(t, "the orphaned worker to exit", func() bool { return !alive(pid) })
}
