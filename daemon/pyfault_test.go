package daemon

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/ephysd/ephysd/pyrt"
)

// Python faults through the service, as the daemon runs them: a hung
// script, a reload storm, and an interpreter stuck for good. The long
// versions run with EPHYSD_LONG_TESTS=1 (make soak).

func pyFaultLong() bool { return os.Getenv("EPHYSD_LONG_TESTS") == "1" }

// pyFaultService writes module and a configuration around it (sim source,
// real time, recording into the test's folder) and makes the service.
func pyFaultService(t *testing.T, module, extra string) (*Service, string) {
	t.Helper()
	dir := t.TempDir()
	mod := filepath.Join(dir, "stage.py")
	if err := os.WriteFile(mod, []byte(module), 0o644); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "ephysd.toml")
	doc := fmt.Sprintf(`
[source]
driver = "sim"
[source.sim]
channels = 4
realtime = true
[[stage]]
module = %q
[recording]
parent_directory = %q
[control]
http = ""
%s`, mod, filepath.Join(dir, "recs"), extra)
	if err := os.WriteFile(path, []byte(doc), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg, err := LoadConfig(path)
	if err != nil {
		t.Fatal(err)
	}
	svc, err := NewService(cfg, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { svc.Close() })
	return svc, path
}

// waitFor polls cond until it holds; the deadline only guards against a
// hang.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("gave up waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// A script that hangs once in a live, recorded acquisition with the
// smallest queue: the watchdog interrupts it at block_timeout_ms, the stage
// shows failed and passes data through from the block it hung on, and the
// recording — read back with neo — has no gap: the queue before the stages
// was sized from the timeout, not from queue_ms (100 ms, which a 300 ms
// hang would overflow).
func TestPyFaultHungStageLeavesNoGap(t *testing.T) {
	svc, _ := pyFaultService(t, `
import time
class PyProcessor:
    def __init__(self, processor, num_channels, sample_rate):
        self.n = 0
    def process(self, data):
        self.n += 1
        data += 1000.0
        if self.n == 300:
            time.sleep(60)
`, `
[pipeline]
queue_ms = 100
[python]
block_timeout_ms = 300
`)
	setRecordRaw(t, svc)
	if err := svc.SetMode(Record); err != nil {
		t.Fatal(err)
	}
	c := svc.Chain()
	st := svc.Stages()[0]
	waitFor(t, "the timeout", func() bool { return st.Status().Timeouts == 1 })
	after := c.Runner.Stats().Blocks + 300
	waitFor(t, "300 more blocks", func() bool { return c.Runner.Stats().Processed >= after })
	status := svc.Status()
	if err := svc.SetMode(Idle); err != nil {
		t.Fatal(err)
	}
	rs := c.Runner.Stats()
	if rs.OverrunBlocks != 0 || rs.Gaps != 0 || rs.Processed != rs.Blocks {
		t.Fatalf("blocks were lost: %+v", rs)
	}
	ss := status.Stages[0]
	if ss.State != "failed" || !ss.PassThrough || ss.Timeouts != 1 || !strings.Contains(ss.LastError, "TimeoutError: process() ran longer than 300ms") {
		t.Fatalf("stage status %+v", ss)
	}
	out := pyCheck(t, `
import sys, glob, os
import numpy as np
from neo.rawio.openephysbinaryrawio import OpenEphysBinaryRawIO

session = sys.argv[1]
r = OpenEphysBinaryRawIO(dirname=session)
r.parse_header()
streams = [s[0] for s in r.header["signal_streams"]]
main = [i for i, s in enumerate(streams) if s.endswith(".sim")][0]
raw = [i for i, s in enumerate(streams) if s.endswith(".sim_raw")][0]
n = r.get_signal_size(0, 0, main)
assert n == r.get_signal_size(0, 0, raw) and n > 20000, (n, r.get_signal_size(0, 0, raw))
d = (r.get_analogsignal_chunk(0, 0, 0, n, main, None).astype(np.int32)
     - r.get_analogsignal_chunk(0, 0, 0, n, raw, None).astype(np.int32))
for f in glob.glob(os.path.join(session, "**", "continuous", "*", "sample_numbers.npy"), recursive=True):
    s = np.load(f)
    assert len(s) == n and (np.diff(s) == 1).all(), (f, len(s), n, np.flatnonzero(np.diff(s) != 1)[:5])
first = int(s[0])
# +1000 uV (5128.2 counts) until the block the stage hung on, then unchanged
k = int(np.argmax((d == 0).all(axis=1)))
assert k > 0 and (first + k) % 30 == 0, (k, first)
assert np.isin(d[:k], (5128, 5129)).all(), d[:k][~np.isin(d[:k], (5128, 5129))][:5]
assert (d[k:] == 0).all(), np.flatnonzero((d[k:] != 0).any(axis=1))[:5]
print("samples %d, contiguous; processed until sample %d, passed through after (%d samples)" % (n, first + k, n - k))
`, svc.Session().Dir())
	t.Logf("recording: %s", strings.TrimSpace(out))
}

// setRecordRaw turns on record_raw for the next acquisition.
func setRecordRaw(t *testing.T, svc *Service) {
	t.Helper()
	svc.mu.Lock()
	svc.cfg.Recording.RecordRaw = true
	svc.mu.Unlock()
}

// processFootprint is what a leak would grow.
type processFootprint struct {
	rssKB, threads, fds, goroutines int
	// Python: objects the cycle collector tracks (modules, classes,
	// functions, instances, dicts, lists) and pymalloc blocks (which also
	// count the free lists CPython fills up to a bound).
	pyObjects, pyBlocks int
	fdNames             []string
}

func (f processFootprint) String() string {
	return fmt.Sprintf("RSS %d kB, %d threads, %d fds, %d goroutines, %d Python objects, %d Python blocks",
		f.rssKB, f.threads, f.fds, f.goroutines, f.pyObjects, f.pyBlocks)
}

func measureFootprint(t *testing.T, rt *pyrt.Runtime) processFootprint {
	t.Helper()
	out := filepath.Join(t.TempDir(), "blocks")
	if err := rt.RunString(fmt.Sprintf(`
import gc, sys
gc.collect()
open(%q, "w").write("%%d %%d" %% (len(gc.get_objects()), sys.getallocatedblocks()))
`, out)); err != nil {
		t.Fatal(err)
	}
	data, _ := os.ReadFile(out)
	var f processFootprint
	if _, err := fmt.Sscan(string(data), &f.pyObjects, &f.pyBlocks); err != nil {
		t.Fatalf("%q: %v", data, err)
	}
	runtime.GC()
	debug.FreeOSMemory()
	statm, err := os.ReadFile("/proc/self/statm")
	if err != nil {
		t.Fatal(err)
	}
	pages, _ := strconv.Atoi(strings.Fields(string(statm))[1])
	f.rssKB = pages * os.Getpagesize() / 1024
	tasks, _ := os.ReadDir("/proc/self/task")
	fds, _ := os.ReadDir("/proc/self/fd")
	f.threads, f.fds, f.goroutines = len(tasks), len(fds), runtime.NumGoroutine()
	for _, fd := range fds {
		target, _ := os.Readlink("/proc/self/fd/" + fd.Name())
		f.fdNames = append(f.fdNames, target)
	}
	return f
}

// Reload storm: the configuration and every module re-read again and again
// while acquiring and recording, as SIGHUP and `ephysd reload` do (20
// times; 100 with EPHYSD_LONG_TESTS=1). Not a block is lost, and after a
// warm-up the process's RSS, threads, file descriptors, goroutines and
// Python's allocated blocks stay within a small fixed tolerance.
func TestPyFaultReloadStorm(t *testing.T) {
	filter, err := os.ReadFile("../examples/bandpass_filter.py")
	if err != nil {
		t.Fatal(err)
	}
	svc, path := pyFaultService(t, string(filter), "")
	if err := svc.SetMode(Record); err != nil {
		t.Fatal(err)
	}
	c := svc.Chain()
	rt := c.Python
	reloads := 20
	if pyFaultLong() {
		reloads = 100
	}
	reload := func() {
		t.Helper()
		if notes, err := svc.Reload(path); err != nil || notes != "" {
			t.Fatalf("reload: %q %v", notes, err)
		}
		time.Sleep(20 * time.Millisecond) // blocks flow between reloads
	}
	for i := 0; i < 5; i++ { // warm-up
		reload()
	}
	// The recorder opens the TTL event files at the first event.
	waitFor(t, "the TTL event files", func() bool {
		m, _ := filepath.Glob(filepath.Join(svc.Session().Dir(), "*", "*", "*", "events", "*", "TTL", "states.npy"))
		return len(m) == 1
	})
	before := measureFootprint(t, rt)
	t0 := time.Now()
	for i := 0; i < reloads; i++ {
		reload()
	}
	took := time.Since(t0)
	after := measureFootprint(t, rt)
	st := svc.Stages()[0].Status()
	rec := svc.Session().Dir()
	if err := svc.SetMode(Idle); err != nil {
		t.Fatal(err)
	}
	rs := c.Runner.Stats()
	t.Logf("%d reloads in %v while recording %d blocks: before %v; after %v", reloads, took.Round(time.Millisecond), rs.Blocks, before, after)
	if rs.OverrunBlocks != 0 || rs.Gaps != 0 || rs.Processed != rs.Blocks {
		t.Fatalf("blocks were lost: %+v", rs)
	}
	if st.State != "running" || st.Errors != 0 {
		t.Fatalf("stage %+v", st)
	}
	// Tolerances: an OS thread the Go runtime starts for a blocking call
	// and keeps, a file the recorder has open for a moment, CPython's free
	// lists filling up (they saturate at about 3000 blocks); a leaked
	// module, class or instance per reload is tens of Python objects each.
	if after.threads > before.threads+2 || after.fds > before.fds+2 || after.goroutines > before.goroutines+5 ||
		after.rssKB > before.rssKB+8*1024 || after.pyObjects > before.pyObjects+50 || after.pyBlocks > before.pyBlocks+4000 {
		t.Fatalf("the footprint grew over %d reloads:\nbefore %v\nafter  %v\nfds before %q\nfds after %q",
			reloads, before, after, before.fdNames, after.fdNames)
	}
	// Every block from the first recorded one on is in the recording.
	pyCheck(t, `
import sys, glob, os
import numpy as np
files = glob.glob(os.path.join(sys.argv[1], "**", "continuous", "*", "sample_numbers.npy"), recursive=True)
assert len(files) == 1, files
s = np.load(files[0])
assert (np.diff(s) == 1).all(), np.flatnonzero(np.diff(s) != 1)[:5]
assert s[-1] + 1 == int(sys.argv[2]), (s[0], s[-1], sys.argv[2])
`, rec, strconv.FormatUint(rs.Samples, 10))
}

// An interpreter stuck for good in C code (a ctypes call that deadlocks):
// the daemon stops waiting for it, every Python stage shows failed with
// what to do, acquisition and recording go on with data passing through,
// the one block the stuck call holds is the recording's only gap, reload
// answers at once with an error, stopping works, and the next acquisition
// runs. In a child process, since its interpreter stays stuck.
func TestPyFaultStuckInterpreter(t *testing.T) {
	if os.Getenv("EPHYSD_PYFAULT_STUCK") != "1" {
		cmd := exec.Command(os.Args[0], "-test.run=^TestPyFaultStuckInterpreter$", "-test.v")
		cmd.Env = append(os.Environ(), "EPHYSD_PYFAULT_STUCK=1")
		done := make(chan struct{})
		var out []byte
		var err error
		go func() { out, err = cmd.CombinedOutput(); close(done) }()
		select {
		case <-done:
		case <-time.After(3 * time.Minute):
			cmd.Process.Kill()
			<-done
			t.Fatalf("the child hung:\n%s", out)
		}
		if err != nil || !strings.Contains(string(out), "--- PASS: TestPyFaultStuckInterpreter") {
			t.Fatalf("child: %v\n%s", err, out)
		}
		for _, l := range strings.Split(string(out), "\n") {
			if strings.Contains(l, "pyfault_test.go") {
				t.Log(strings.TrimSpace(l))
			}
		}
		return
	}
	svc, path := pyFaultService(t, `
import ctypes
class PyProcessor:
    def __init__(self, processor, num_channels, sample_rate):
        self.n = 0
    def process(self, data):
        self.n += 1
        data += 1000.0
        if self.n == 200:
            m = ctypes.create_string_buffer(64)
            libc = ctypes.CDLL(None)
            libc.pthread_mutex_lock(m)
            libc.pthread_mutex_lock(m)   # never returns, ignores signals
`, `
[python]
block_timeout_ms = 150
`)
	if err := svc.SetMode(Record); err != nil {
		t.Fatal(err)
	}
	c := svc.Chain()
	waitFor(t, "the interpreter to be given up", func() bool { ok, _ := c.Python.Stuck(); return ok })
	after := c.Runner.Stats().Blocks + 300
	waitFor(t, "300 more blocks", func() bool { return c.Runner.Stats().Processed >= after })
	if err := svc.Healthy(); err != nil {
		t.Fatalf("the pipeline should be healthy: %v", err)
	}
	status := svc.Status()
	for _, s := range status.Stages {
		if s.State != "failed" || !s.PassThrough || !strings.Contains(s.LastError, "restart ephysd") {
			t.Fatalf("stage %+v", s)
		}
	}
	t0 := time.Now()
	if _, err := svc.Reload(path); err == nil || !strings.Contains(err.Error(), "restart ephysd") {
		t.Fatalf("reload: %v", err)
	}
	reloadTook := time.Since(t0)
	rec := svc.Session().Dir()
	t0 = time.Now()
	if err := svc.SetMode(Idle); err != nil {
		t.Fatal(err)
	}
	stopTook := time.Since(t0)
	rs := c.Runner.Stats()
	if rs.OverrunBlocks != 1 || rs.Processed != rs.Blocks-1 || rs.Gaps != 0 {
		t.Fatalf("want exactly the stuck block lost: %+v", rs)
	}
	out := pyCheck(t, `
import sys, glob, os
import numpy as np
files = glob.glob(os.path.join(sys.argv[1], "**", "continuous", "*", "sample_numbers.npy"), recursive=True)
assert len(files) == 1, files
s = np.load(files[0])
jumps = np.flatnonzero(np.diff(s) != 1)
assert len(jumps) == 1 and s[jumps[0] + 1] - s[jumps[0]] == 31, (jumps, s[jumps] if len(jumps) else None)
print("one gap of 30 samples at sample %d in %d samples" % (s[jumps[0]] + 1, len(s)))
`, rec)
	// The next acquisition runs without the interpreter.
	if err := svc.SetMode(Acquire); err != nil {
		t.Fatal(err)
	}
	c2 := svc.Chain()
	waitFor(t, "blocks in the next acquisition", func() bool { return c2.Runner.Stats().Processed >= 200 })
	if err := svc.SetMode(Idle); err != nil {
		t.Fatal(err)
	}
	if rs := c2.Runner.Stats(); rs.OverrunBlocks != 0 {
		t.Fatalf("next acquisition: %+v", rs)
	}
	t.Logf("stuck interpreter: %s; reload answered in %v; stopping took %v", strings.TrimSpace(out),
		reloadTook.Round(time.Microsecond), stopTook.Round(time.Millisecond))
}
