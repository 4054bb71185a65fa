package pyrt

import (
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
	"unsafe"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/ephysd/ephysd/pipeline"
	"github.com/ephysd/ephysd/pyrt/pyrttest"
)

var (
	testRT   *Runtime
	observed *observer.ObservedLogs
)

// TestMain starts Python once for the package (numpy cannot be re-imported
// after Py_Finalize). PATH gets a fake python3 first, as a pyenv shim would
// be: the embedded interpreter must not pick it up.
func TestMain(m *testing.M) {
	if venv := os.Getenv("PYRT_TEST_VENV"); venv != "" {
		os.Exit(venvHelper(venv))
	}
	if name := os.Getenv("PYRT_TEST_STUCK"); name != "" {
		os.Exit(stuckHelper(name))
	}
	dir, err := os.MkdirTemp("", "pyrt-path")
	if err != nil {
		panic(err)
	}
	fake := "#!/bin/sh\necho 'this is not the python you are looking for' >&2\nexit 3\n"
	for _, n := range []string{"python3", "python", "python3.11"} {
		if err := os.WriteFile(filepath.Join(dir, n), []byte(fake), 0o755); err != nil {
			panic(err)
		}
	}
	os.Setenv("PATH", dir+":"+os.Getenv("PATH"))
	os.Setenv("PYTHONHOME", dir) // ignored: isolated mode
	os.Setenv("PYTHONPATH", dir)

	core, logs := observer.New(zapcore.DebugLevel)
	observed = logs
	log := zap.New(core)
	if os.Getenv("PYRT_TEST_LOG") != "" {
		dev, _ := zap.NewDevelopment()
		log = zap.New(zapcore.NewTee(core, dev.Core()))
	}
	testRT, err = Start(Config{Log: log})
	if err != nil {
		fmt.Fprintln(os.Stderr, "cannot start Python:", err)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

func writeModule(t *testing.T, dir, name, src string) string {
	t.Helper()
	if dir == "" {
		dir = t.TempDir()
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, []byte(src), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

var nextID = 200
var idMu sync.Mutex

func newID() int {
	idMu.Lock()
	defer idMu.Unlock()
	nextID++
	return nextID
}

func newStage(t *testing.T, path string, channels int) *Stage {
	t.Helper()
	id := newID()
	// A name of its own per stage, so that log checks see only this
	// stage's lines even when the test runs several times (-count).
	name := fmt.Sprintf("%s#%d", strings.TrimSuffix(filepath.Base(path), ".py"), id)
	s, err := testRT.NewStage(StageConfig{ID: id, Name: name, Path: path, Channels: channels, SampleRate: 30000})
	if err != nil {
		t.Fatalf("NewStage: %v", err)
	}
	return s
}

// testSource makes blocks of pyrttest's known signal (pyrttest.Fill).
type testSource struct {
	channels, blocks, n int
	next                int64
}

func (s *testSource) ReadBlock(b *pipeline.Block) error {
	if s.n == s.blocks {
		return io.EOF
	}
	s.n++
	pyrttest.Fill(b, s.next)
	s.next += int64(b.Samples)
	return nil
}

var inputValue = pyrttest.InputValue

// collector keeps a copy of every processed block.
type collector struct {
	mu     sync.Mutex
	data   [][]float32
	first  []int64
	events [][]pipeline.Event
	ended  bool
}

func (c *collector) Consume(b *pipeline.Block) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.data = append(c.data, append([]float32(nil), b.Data[:b.Channels*b.Samples]...))
	c.first = append(c.first, b.FirstSample)
	c.events = append(c.events, append([]pipeline.Event(nil), b.Events...))
	return nil
}

func (c *collector) End() error { c.ended = true; return nil }

func runPipeline(t *testing.T, channels, samples, blocks int, stages []pipeline.Stage, before func(r *pipeline.Runner)) *collector {
	t.Helper()
	pool, err := pipeline.NewPool(pipeline.PoolSizeFor(8, false), channels, samples)
	if err != nil {
		t.Fatal(err)
	}
	col := &collector{}
	r, err := pipeline.NewRunner(pipeline.RunnerConfig{
		Source: &testSource{channels: channels, blocks: blocks}, SourceID: 100, Pool: pool,
		Stages: stages, Consumers: []pipeline.Consumer{col}, QueueDepth: 8, Backpressure: true,
		Executor: testRT,
	})
	if err != nil {
		t.Fatal(err)
	}
	testRT.RegisterEventChannel(100, "TTL Input")
	if before != nil {
		before(r)
	}
	if err := r.Start(); err != nil {
		t.Fatal(err)
	}
	if err := r.Wait(); err != nil {
		t.Fatal(err)
	}
	return col
}

func logsFor(stage string) []observer.LoggedEntry {
	var out []observer.LoggedEntry
	for _, e := range observed.All() {
		if e.ContextMap()["stage"] == stage {
			out = append(out, e)
		}
	}
	return out
}

// The compatibility suite: a script using every member of the Open Ephys
// Python Processor API checks, from inside Python, what it is given.
const apiScript = `
import numpy as np
import oe_pyprocessor

calls = []

class PyProcessor:
    def __init__(self, processor, num_channels, sample_rate):
        assert isinstance(processor, oe_pyprocessor.PythonProcessor), type(processor)
        assert isinstance(num_channels, int) and num_channels == 3, num_channels
        assert isinstance(sample_rate, float) and sample_rate == 30000.0, sample_rate
        self.processor = processor
        self.blocks = 0
        calls.append("init")

    def start_acquisition(self):
        calls.append("start_acquisition")

    def stop_acquisition(self):
        calls.append("stop_acquisition")

    def start_recording(self, recording_dir):
        assert isinstance(recording_dir, str)
        calls.append("start_recording:" + recording_dir)

    def stop_recording(self):
        calls.append("stop_recording")

    def handle_ttl_event(self, source_node, channel, sample_number, line, state):
        assert isinstance(source_node, int) and isinstance(channel, str)
        assert isinstance(sample_number, int) and isinstance(line, int) and isinstance(state, bool)
        calls.append(("ttl", source_node, channel, sample_number, line, state, self.blocks))

    def process(self, data):
        assert isinstance(data, np.ndarray)
        assert data.dtype == np.float32, data.dtype
        assert data.ndim == 2 and data.shape[0] == 3, data.shape
        assert data.flags["C_CONTIGUOUS"] and data.flags["WRITEABLE"]
        calls.append(("process", self.processor.sample_number, data.shape[1], self.blocks))
        data *= 2
        data[2] = 0
        if self.blocks == 0:
            self.processor.add_python_event(3, True)
            oe_pyprocessor.add_python_event(4, True)
        if self.blocks == 1:
            self.processor.add_python_event(3, False, sample_number=self.processor.sample_number + 7)
        self.blocks += 1
        return 12345  # a return value changes nothing
`

func TestAPICompatibility(t *testing.T) {
	dir := t.TempDir()
	path := writeModule(t, dir, "api_suite.py", apiScript)
	s := newStage(t, path, 3)
	const samples, blocks = 20, 4
	col := runPipeline(t, 3, samples, blocks, []pipeline.Stage{s}, func(r *pipeline.Runner) {
		r.StartRecording(&pipeline.Recording{Dir: "/tmp/session dir", Experiment: 1, Number: 1})
	})
	if st := s.Status(); st.State != "running" || st.Errors != 0 {
		t.Fatalf("status %+v", st)
	}
	if len(col.data) != blocks {
		t.Fatalf("got %d blocks", len(col.data))
	}
	// In-place semantics: channels 0 and 1 doubled, channel 2 zeroed.
	for bi, d := range col.data {
		for c := 0; c < 3; c++ {
			for i := 0; i < samples; i++ {
				want := 2 * inputValue(c, col.first[bi]+int64(i))
				if c == 2 {
					want = 0
				}
				if got := d[c*samples+i]; got != want {
					t.Fatalf("block %d ch %d sample %d: got %v want %v", bi, c, i, got, want)
				}
			}
		}
	}
	// Events: both forms, stamped with the block's first sample, explicit sample number.
	var py []pipeline.Event
	for bi, evs := range col.events {
		for _, e := range evs {
			if e.Processor == s.ID() {
				py = append(py, e)
				if bi == 0 && e.SampleNumber != 0 {
					t.Errorf("event %+v: want sample 0", e)
				}
			}
		}
	}
	if len(py) != 3 || py[0].Line != 3 || !py[0].State || py[1].Line != 4 || py[2].Line != 3 || py[2].State || py[2].SampleNumber != samples+7 {
		t.Fatalf("python events %+v", py)
	}
	if py[1].FullWord != 1<<3|1<<4 || py[2].FullWord != 1<<4 {
		t.Fatalf("full words %x %x", py[1].FullWord, py[2].FullWord)
	}
	// Order of calls, checked in Python: hooks in order, TTL handlers before
	// process of their block, with the right arguments.
	check := fmt.Sprintf(`
import sys
calls = sys.modules[%q].calls
assert calls[0] == "init", calls
assert calls[1] == "start_acquisition", calls
assert calls[2] == "start_recording:/tmp/session dir", calls
assert calls[-2] == "stop_recording", calls[-3:]
assert calls[-1] == "stop_acquisition", calls[-3:]
body = calls[3:-2]
ttl = [c for c in body if c[0] == "ttl"]
# line 0 is high on samples [5,25) of every 40: edges at 5, 25, 45, 65 in 80 samples
assert [(c[3], c[5]) for c in ttl] == [(5, True), (25, False), (45, True), (65, False)], ttl
assert all(c[1] == 100 and c[2] == "TTL Input" and c[4] == 0 for c in ttl), ttl
# each TTL handler runs before process of the block that holds its sample
for c in ttl:
    idx = body.index(c)
    nxt = [b for b in body[idx:] if b[0] == "process"][0]
    assert nxt[1] <= c[3] < nxt[1] + nxt[2], (c, nxt)
procs = [c for c in body if c[0] == "process"]
assert [p[1] for p in procs] == [0, 20, 40, 60], procs
`, s.modname)
	if err := testRT.RunString(check); err != nil {
		t.Fatal(err)
	}
}

func TestZeroCopyView(t *testing.T) {
	path := writeModule(t, "", "zerocopy.py", `
addresses = []
class PyProcessor:
    def __init__(self, processor, num_channels, sample_rate):
        pass
    def process(self, data):
        addresses.append((data.__array_interface__["data"][0], data.shape, data.strides))
`)
	s := newStage(t, path, 4)
	pool, err := pipeline.NewPool(2, 4, 16)
	if err != nil {
		t.Fatal(err)
	}
	b := pool.TryGet()
	b.Samples = 10 // a shorter block: the view must follow the current length
	testRT.Do(func() {
		if err := s.Process(b); err != nil {
			t.Error(err)
		}
	})
	addr := uintptr(unsafe.Pointer(&b.Data[0]))
	check := fmt.Sprintf(`
import sys
a = sys.modules[%q].addresses
assert a == [(%d, (4, 10), (40, 4))], (a, %d)
`, s.modname, addr, addr)
	if err := testRT.RunString(check); err != nil {
		t.Fatal(err)
	}
	b.Release()
}

func TestLegacyConstructorAndModuleLevelEvent(t *testing.T) {
	path := writeModule(t, "", "legacy.py", `
import oe_pyprocessor
class PyProcessor:
    def __init__(self, num_channels, sample_rate):
        self.n = num_channels
    def process(self, data):
        data += self.n
        oe_pyprocessor.add_python_event(1, True)
`)
	s := newStage(t, path, 2)
	col := runPipeline(t, 2, 10, 2, []pipeline.Stage{s}, nil)
	if got, want := col.data[0][0], inputValue(0, 0)+2; got != want {
		t.Fatalf("legacy constructor: got %v want %v", got, want)
	}
	n := 0
	for _, evs := range col.events {
		for _, e := range evs {
			if e.Processor == s.ID() {
				n++
			}
		}
	}
	if n != 2 {
		t.Fatalf("module-level add_python_event: %d events, want 2", n)
	}
}

func TestRebindingDoesNotChangeOutput(t *testing.T) {
	path := writeModule(t, "", "rebind.py", `
class PyProcessor:
    def __init__(self, processor, num_channels, sample_rate):
        pass
    def process(self, data):
        data = data * 3
        return data
`)
	s := newStage(t, path, 2)
	col := runPipeline(t, 2, 10, 1, []pipeline.Stage{s}, nil)
	if got, want := col.data[0][5], inputValue(0, 5); got != want {
		t.Fatalf("got %v want %v", got, want)
	}
}

func TestTwoStagesSameFileName(t *testing.T) {
	root := t.TempDir()
	a := writeModule(t, filepath.Join(root, "a"), "stage.py", `
class PyProcessor:
    def __init__(self, processor, num_channels, sample_rate):
        pass
    def process(self, data):
        data += 1
        self_processor = None
`)
	b := writeModule(t, filepath.Join(root, "b"), "stage.py", `
import oe_pyprocessor
class PyProcessor:
    def __init__(self, processor, num_channels, sample_rate):
        self.p = processor
    def handle_ttl_event(self, source_node, channel, sample_number, line, state):
        self.seen = getattr(self, "seen", []) + [(source_node, channel, line)]
    def process(self, data):
        data *= 10
`)
	// the first stage emits an event the second sees as a TTL event from stage 1
	sa := newStage(t, a, 2)
	sb := newStage(t, b, 2)
	if sa.modname == sb.modname {
		t.Fatalf("both stages use module name %q", sa.modname)
	}
	col := runPipeline(t, 2, 10, 2, []pipeline.Stage{sa, sb}, nil)
	if got, want := col.data[1][3], (inputValue(0, 13)+1)*10; got != want {
		t.Fatalf("chain: got %v want %v", got, want)
	}
}

func TestEventsFromEarlierStageReachLaterStage(t *testing.T) {
	first := writeModule(t, "", "emitter.py", `
class PyProcessor:
    def __init__(self, processor, num_channels, sample_rate):
        self.p = processor
    def process(self, data):
        self.p.add_python_event(7, True)
`)
	second := writeModule(t, "", "listener.py", `
seen = []
class PyProcessor:
    def __init__(self, processor, num_channels, sample_rate):
        pass
    def handle_ttl_event(self, source_node, channel, sample_number, line, state):
        seen.append((source_node, channel, sample_number, line, state))
    def process(self, data):
        pass
`)
	s1 := newStage(t, first, 1)
	s2 := newStage(t, second, 1)
	runPipeline(t, 1, 50, 1, []pipeline.Stage{s1, s2}, nil)
	check := fmt.Sprintf(`
import sys
seen = sys.modules[%q].seen
assert (%d, "Python Processor Output", 0, 7, True) in seen, seen
assert (100, "TTL Input", 5, 0, True) in seen, seen
`, s2.modname, s1.ID())
	if err := testRT.RunString(check); err != nil {
		t.Fatal(err)
	}
}

func TestProcessRaisingIsContained(t *testing.T) {
	path := writeModule(t, "", "raiser.py", `
class PyProcessor:
    def __init__(self, processor, num_channels, sample_rate):
        self.n = 0
    def process(self, data):
        self.n += 1
        data *= 2          # partly done when it raises
        if self.n % 2 == 0:
            raise ValueError("bad block %d" % self.n)
`)
	s := newStage(t, path, 2)
	col := runPipeline(t, 2, 10, 6, []pipeline.Stage{s}, nil)
	for bi, d := range col.data {
		want := 2 * inputValue(1, col.first[bi]+3)
		if bi%2 == 1 { // blocks 2, 4, 6 raised: unchanged
			want = inputValue(1, col.first[bi]+3)
		}
		if got := d[10+3]; got != want {
			t.Fatalf("block %d: got %v want %v", bi, got, want)
		}
	}
	st := s.Status()
	if st.State != "failed" || st.Errors != 3 || !strings.Contains(st.LastError, "ValueError: bad block") {
		t.Fatalf("status %+v", st)
	}
	var full, later int
	for _, e := range logsFor(s.Name()) {
		tb, _ := e.ContextMap()["traceback"].(string)
		if strings.Contains(tb, "Traceback") {
			full++
			if !strings.Contains(tb, path+`", line 9, in process`) || !strings.Contains(tb, "ValueError: bad block 2") {
				t.Errorf("traceback lacks file and line:\n%s", tb)
			}
		}
		if e.Message == "python stage raised again" {
			later++
		}
	}
	if full != 1 || later > 1 {
		t.Fatalf("want one full traceback and at most one rate-limited repeat, got %d and %d", full, later)
	}
}

func TestDisableOnError(t *testing.T) {
	path := writeModule(t, "", "disabler.py", `
class PyProcessor:
    def __init__(self, processor, num_channels, sample_rate):
        pass
    def process(self, data):
        data += 1
        raise RuntimeError("always")
`)
	s, err := testRT.NewStage(StageConfig{ID: newID(), Path: path, Channels: 1, SampleRate: 30000, OnError: OnErrorDisable})
	if err != nil {
		t.Fatal(err)
	}
	col := runPipeline(t, 1, 10, 3, []pipeline.Stage{s}, nil)
	for bi, d := range col.data {
		if d[0] != inputValue(0, col.first[bi]) {
			t.Fatalf("block %d changed", bi)
		}
	}
	if st := s.Status(); st.State != "disabled" || st.Errors != 1 {
		t.Fatalf("status %+v", st)
	}
}

func TestBadImportAndMissingProcess(t *testing.T) {
	cases := map[string]string{
		"syntax.py":     "class PyProcessor:\n    def process(self, data)\n        pass\n",
		"importerr.py":  "import no_such_module_ephysd\n",
		"noprocess.py":  "class PyProcessor:\n    def __init__(self, processor, num_channels, sample_rate):\n        pass\n",
		"noclass.py":    "x = 1\n",
		"initraises.py": "class PyProcessor:\n    def __init__(self, processor, num_channels, sample_rate):\n        raise KeyError('nope')\n    def process(self, data):\n        pass\n",
	}
	want := map[string]string{
		"syntax.py":     "SyntaxError",
		"importerr.py":  "ModuleNotFoundError: No module named 'no_such_module_ephysd'",
		"noprocess.py":  "has no process(self, data) method",
		"noclass.py":    "defines no class PyProcessor",
		"initraises.py": "KeyError: 'nope'",
	}
	for name, src := range cases {
		t.Run(name, func(t *testing.T) {
			path := writeModule(t, "", name, src)
			s, err := testRT.NewStage(StageConfig{ID: newID(), Path: path, Channels: 1, SampleRate: 30000})
			if s == nil {
				t.Fatalf("no stage: %v", err)
			}
			if err == nil || !strings.Contains(err.Error(), want[name]) || !strings.Contains(err.Error(), path) {
				t.Fatalf("error %v: want %q and the path", err, want[name])
			}
			if st := s.Status(); st.State != "not loaded" {
				t.Fatalf("status %+v", st)
			}
			// Data passes through; acquisition goes on.
			col := runPipeline(t, 1, 10, 2, []pipeline.Stage{s}, nil)
			if len(col.data) != 2 || col.data[1][4] != inputValue(0, 14) {
				t.Fatalf("pass-through failed: %v", col.data)
			}
		})
	}
}

func TestMissingFileIsAnError(t *testing.T) {
	_, err := testRT.NewStage(StageConfig{ID: newID(), Path: "/nonexistent/x.py", Channels: 1, SampleRate: 1})
	if err == nil || !strings.Contains(err.Error(), "/nonexistent/x.py: no such file") {
		t.Fatalf("got %v", err)
	}
}

func TestReloadWhileAcquiring(t *testing.T) {
	dir := t.TempDir()
	path := writeModule(t, dir, "reloadme.py", `
class PyProcessor:
    def __init__(self, processor, num_channels, sample_rate):
        pass
    def process(self, data):
        data += 1
`)
	s := newStage(t, path, 1)
	const blocks = 400
	src := &slowSource{testSource: testSource{channels: 1, blocks: blocks}}
	pool, _ := pipeline.NewPool(pipeline.PoolSizeFor(64, false), 1, 10)
	col := &collector{}
	r, _ := pipeline.NewRunner(pipeline.RunnerConfig{Source: src, SourceID: 100, Pool: pool,
		Stages: []pipeline.Stage{s}, Consumers: []pipeline.Consumer{col}, QueueDepth: 64, Executor: testRT})
	if err := r.Start(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(30 * time.Millisecond)
	writeModule(t, dir, "reloadme.py", `
class PyProcessor:
    def __init__(self, processor, num_channels, sample_rate):
        pass
    def process(self, data):
        data += 100
`)
	if err := s.Reload(); err != nil {
		t.Fatal(err)
	}
	// A broken version: the previous one keeps running.
	writeModule(t, dir, "reloadme.py", "this is not python\n")
	if err := s.Reload(); err == nil {
		t.Fatal("reload of a broken module succeeded")
	}
	if err := r.Wait(); err != nil {
		t.Fatal(err)
	}
	st := r.Stats()
	if st.OverrunBlocks != 0 || len(col.data) != blocks {
		t.Fatalf("lost blocks across reload: %+v, %d consumed", st, len(col.data))
	}
	var old, new int
	for bi, d := range col.data {
		switch d[0] - inputValue(0, col.first[bi]) {
		case 1:
			if new > 0 {
				t.Fatalf("block %d: old version after the new one", bi)
			}
			old++
		case 100:
			new++
		default:
			t.Fatalf("block %d: value %v", bi, d[0])
		}
	}
	if old == 0 || new == 0 {
		t.Fatalf("old %d new %d: reload did not happen mid-stream", old, new)
	}
	if s.Status().State != "running" {
		t.Fatalf("status %+v", s.Status())
	}
}

// slowSource paces blocks at 1 per 0.5 ms, like a live device.
type slowSource struct{ testSource }

func (s *slowSource) ReadBlock(b *pipeline.Block) error {
	time.Sleep(500 * time.Microsecond)
	return s.testSource.ReadBlock(b)
}

func TestPrintGoesToLogTaggedWithStage(t *testing.T) {
	path := writeModule(t, "", "printer.py", `
import sys
print("hello from init")
class PyProcessor:
    def __init__(self, processor, num_channels, sample_rate):
        print("constructed", num_channels)
    def process(self, data):
        print("block", data.shape[1])
        sys.stderr.write("careful\n")
`)
	s := newStage(t, path, 1)
	runPipeline(t, 1, 10, 1, []pipeline.Stage{s}, nil)
	var out, errs []string
	for _, e := range logsFor(s.Name()) {
		switch e.ContextMap()["stream"] {
		case "stdout":
			out = append(out, e.Message)
		case "stderr":
			errs = append(errs, e.Message)
		}
	}
	if strings.Join(out, "|") != "hello from init|constructed 1|block 10" || strings.Join(errs, "|") != "careful" {
		t.Fatalf("stdout %q stderr %q", out, errs)
	}
}

func TestInterpreterIsDebianPythonDespitePath(t *testing.T) {
	in := testRT.Interpreter()
	if in.Executable != DefaultExecutable() || in.Prefix != "/usr" {
		t.Fatalf("interpreter %+v", in)
	}
	if err := testRT.RunString(`
import sys, os, numpy
assert sys.prefix == "/usr", sys.prefix
assert sys.executable == "` + DefaultExecutable() + `", sys.executable
assert os.__file__.startswith("/usr/lib/python3"), os.__file__
assert numpy.__file__.startswith("/usr/lib/python3/dist-packages"), numpy.__file__
`); err != nil {
		t.Fatal(err)
	}
}

func TestResolveInterpreterErrors(t *testing.T) {
	dir := t.TempDir()
	fake312 := filepath.Join(dir, "python3.12")
	os.WriteFile(fake312, []byte("#!/bin/sh\necho 3.12.1\necho /opt/py312\n"), 0o755)
	_, err := ResolveInterpreter(fake312, "")
	if err == nil || !strings.Contains(err.Error(), fake312) || !strings.Contains(err.Error(), "is Python 3.12.1") {
		t.Fatalf("wrong version: %v", err)
	}
	if _, err := ResolveInterpreter("python3", ""); err == nil || !strings.Contains(err.Error(), "does not search PATH") {
		t.Fatalf("bare name: %v", err)
	}
	if _, err := ResolveInterpreter(filepath.Join(dir, "nope"), ""); err == nil || !strings.Contains(err.Error(), "not found") {
		t.Fatalf("missing: %v", err)
	}
	if _, err := ResolveInterpreter("", dir); err == nil || !strings.Contains(err.Error(), "no pyvenv.cfg") {
		t.Fatalf("not a venv: %v", err)
	}
	// Starting again with another interpreter is refused with a clear error.
	if _, err := Start(Config{Executable: "/usr/bin/python3"}); err == nil && !strings.HasSuffix(DefaultExecutable(), "python3") {
		// /usr/bin/python3 resolves to a different path string than /usr/bin/python3.11
		t.Fatal("a second interpreter was accepted")
	}
}

// TestVenvSitePackagesImport makes a virtual environment with a package of
// its own and runs this test binary again, embedding Python from that venv:
// the package must import (and numpy from the system site-packages too).
func TestVenvSitePackagesImport(t *testing.T) {
	venv := filepath.Join(t.TempDir(), "venv")
	out, err := exec.Command("/usr/bin/python"+LinkedMinorVersion(), "-I", "-m", "venv", "--without-pip", "--system-site-packages", venv).CombinedOutput()
	if err != nil {
		t.Fatalf("making a venv: %v: %s", err, out)
	}
	site := filepath.Join(venv, "lib", "python"+LinkedMinorVersion(), "site-packages")
	if err := os.WriteFile(filepath.Join(site, "ephysd_venv_marker.py"), []byte("WHERE = 'venv'\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	in, err := ResolveInterpreter("", venv)
	if err != nil {
		t.Fatal(err)
	}
	if in.Venv != venv || in.Prefix != venv || !strings.HasPrefix(in.Executable, venv+"/bin/") {
		t.Fatalf("venv interpreter %+v", in)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "PYRT_TEST_VENV="+venv)
	out, err = cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "venv ok") {
		t.Fatalf("embedded Python from the venv: %v\n%s", err, out)
	}
}

func venvHelper(venv string) int {
	rt, err := Start(Config{Venv: venv})
	if err != nil {
		fmt.Println("start:", err)
		return 1
	}
	err = rt.RunString(`
import sys, ephysd_venv_marker, numpy
assert ephysd_venv_marker.WHERE == "venv"
assert sys.prefix == "` + venv + `", sys.prefix
`)
	if err != nil {
		fmt.Println(err)
		return 1
	}
	fmt.Println("venv ok")
	return 0
}

func TestHandleSpikeBeforeProcess(t *testing.T) {
	path := writeModule(t, "", "spikes.py", `
import numpy as np
seen = []
class PyProcessor:
    def __init__(self, processor, num_channels, sample_rate):
        pass
    def handle_spike(self, source_node, electrode_name, num_channels, num_samples, sample_number, sorted_id, spike_data):
        assert spike_data.dtype == np.float32 and spike_data.shape == (num_channels, num_samples)
        assert not spike_data.flags["WRITEABLE"]
        seen.append((source_node, electrode_name, num_channels, num_samples, sample_number, sorted_id, spike_data.tolist()))
    def process(self, data):
        seen.append("process")
`)
	s := newStage(t, path, 2)
	pool, _ := pipeline.NewPool(1, 2, 10)
	defer pool.Close(true)
	b := pool.TryGet()
	defer b.Release()
	b.FirstSample = 100
	b.Spikes = append(b.Spikes, pipeline.Spike{Processor: 100, Electrode: "Stereotrode 1", SampleNumber: 104, SortedID: 2,
		Channels: 2, Samples: 3, Waveform: []float32{1, 2, 3, -4, -5, -6}})
	testRT.Do(func() { s.Process(b) })
	check := fmt.Sprintf(`
import sys
seen = sys.modules[%q].seen
assert seen == [(100, "Stereotrode 1", 2, 3, 104, 2, [[1.0, 2.0, 3.0], [-4.0, -5.0, -6.0]]), "process"], seen
`, s.modname)
	if err := testRT.RunString(check); err != nil {
		t.Fatal(err)
	}
}

// Python runs with its signal handlers off, and a script cannot take
// SIGINT away from the daemon.
func TestSignalsStayWithTheDaemon(t *testing.T) {
	err := testRT.RunString(`
import signal
assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler, "Python installed its SIGINT handler"
before = signal.getsignal(signal.SIGINT)
signal.signal(signal.SIGINT, lambda *a: None)
assert signal.getsignal(signal.SIGINT) is before, "a script replaced the SIGINT handler"
`)
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, e := range observed.All() {
		if strings.Contains(e.Message, "signal.signal(") && strings.Contains(e.Message, "ignored") {
			found = true
		}
	}
	if !found {
		t.Fatal("no log line for the ignored signal.signal call")
	}
}

// A script stuck in an endless loop gets TimeoutError from the watchdog
// after the default 2 s: the stage fails and passes the block it hung on,
// and every later one, through unchanged until it is reloaded.
func TestHungProcessIsInterrupted(t *testing.T) {
	path := writeModule(t, "", "hang.py", `
class PyProcessor:
    def __init__(self, processor, num_channels, sample_rate):
        self.n = 0
    def process(self, data):
        self.n += 1
        if self.n == 2:
            while True:
                pass
        data += 1
`)
	s := newStage(t, path, 1)
	start := time.Now()
	col := runPipeline(t, 1, 10, 4, []pipeline.Stage{s}, nil)
	if time.Since(start) < DefaultBlockTimeout {
		t.Fatalf("interrupted before the 2 s limit")
	}
	for bi, d := range col.data {
		want := inputValue(0, col.first[bi])
		if bi == 0 {
			want++
		}
		if d[0] != want {
			t.Fatalf("block %d: %v want %v", bi, d[0], want)
		}
	}
	st := s.Status()
	if st.State != "failed" || !st.PassThrough || st.Timeouts != 1 || st.Errors != 1 || !strings.Contains(st.LastError, "TimeoutError: process() ran longer than 2s") {
		t.Fatalf("status %+v", st)
	}
	// A reload re-enables it.
	if err := s.Reload(); err != nil {
		t.Fatal(err)
	}
	if st := s.Status(); st.State != "running" || st.PassThrough {
		t.Fatalf("after reload: %+v", st)
	}
	col = runPipeline(t, 1, 10, 1, []pipeline.Stage{s}, nil)
	if col.data[0][0] != inputValue(0, 0)+1 {
		t.Fatalf("reloaded stage did not run: %v", col.data[0][0])
	}
}

// Exceptions in hooks and handlers are contained too: logged, counted, and
// the data goes on through process.
func TestHookAndHandlerExceptionsAreContained(t *testing.T) {
	path := writeModule(t, "", "hookraise.py", `
class PyProcessor:
    def __init__(self, processor, num_channels, sample_rate):
        pass
    def start_acquisition(self):
        raise RuntimeError("start failed")
    def handle_ttl_event(self, source_node, channel, sample_number, line, state):
        raise RuntimeError("ttl failed")
    def process(self, data):
        data += 5
    def stop_acquisition(self):
        raise RuntimeError("stop failed")
`)
	s := newStage(t, path, 1)
	col := runPipeline(t, 1, 40, 3, []pipeline.Stage{s}, nil)
	for bi, d := range col.data {
		if d[0] != inputValue(0, col.first[bi])+5 {
			t.Fatalf("block %d not processed after a handler raised", bi)
		}
	}
	st := s.Status()
	// start + 3 blocks with TTL edges (one handler raise each is logged) + stop
	if st.Errors < 3 || !strings.Contains(st.LastError, "RuntimeError") {
		t.Fatalf("status %+v", st)
	}
	var sawStart bool
	for _, e := range logsFor(s.Name()) {
		if tb, _ := e.ContextMap()["traceback"].(string); strings.Contains(tb, "start failed") {
			sawStart = true
		}
	}
	if !sawStart {
		t.Fatal("start_acquisition's traceback was not logged")
	}
}

// A reload right after an edit runs the new file even when it has the
// same size and modification time (to the second) as the old one, which
// a cached .pyc would take for the same file.
func TestReloadIgnoresStaleBytecode(t *testing.T) {
	dir := t.TempDir()
	const tmpl = `
class PyProcessor:
    def __init__(self, processor, num_channels, sample_rate):
        pass
    def process(self, data):
        data += %d
`
	path := writeModule(t, dir, "samesize.py", fmt.Sprintf(tmpl, 1))
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	s := newStage(t, path, 1)
	pool, _ := pipeline.NewPool(1, 1, 10)
	defer pool.Close(true)
	run := func() float32 {
		b := pool.TryGet()
		defer b.Release()
		b.Data[0] = 0
		testRT.Do(func() { s.Process(b) })
		return b.Data[0]
	}
	if v := run(); v != 1 {
		t.Fatalf("first version: %v, want 1", v)
	}
	os.MkdirAll(filepath.Join(dir, "__pycache__"), 0o755) // where a .pyc would go
	writeModule(t, dir, "samesize.py", fmt.Sprintf(tmpl, 7))
	if err := os.Chtimes(path, fi.ModTime(), fi.ModTime()); err != nil {
		t.Fatal(err)
	}
	if err := s.Reload(); err != nil {
		t.Fatal(err)
	}
	if v := run(); v != 7 {
		t.Fatalf("after the reload: %v, want 7 (the old version ran from a stale .pyc?)", v)
	}
}
