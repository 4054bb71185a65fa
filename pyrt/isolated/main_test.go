package isolated

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

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/ephysd/ephysd/pipeline"
	"github.com/ephysd/ephysd/pyrt"
	"github.com/ephysd/ephysd/pyrt/pyrttest"
)

// reexecEnv makes the test binary a worker, as daemon.ReexecEnv does for
// the ephysd binary's hidden subcommands.
const reexecEnv = "EPHYSD_REEXEC"

var (
	testRT   *pyrt.Runtime // the in-process interpreter, for comparisons
	observed *observer.ObservedLogs
	testLog  *zap.Logger
)

// TestMain runs the worker when the test binary is re-executed as one;
// otherwise it starts Python in this process (once: numpy cannot be
// re-imported) for the in-process side of the comparisons.
func TestMain(m *testing.M) {
	switch os.Getenv(reexecEnv) {
	case WorkerRole:
		os.Exit(WorkerMain(os.Stderr))
	case parentRole:
		os.Exit(parentMain(os.Getenv("ISOLATED_TEST_MODULE")))
	}
	core, logs := observer.New(zapcore.DebugLevel)
	observed = logs
	testLog = zap.New(core)
	if os.Getenv("ISOLATED_TEST_LOG") != "" {
		dev, _ := zap.NewDevelopment()
		testLog = zap.New(zapcore.NewTee(core, dev.Core()))
	}
	var err error
	testRT, err = pyrt.Start(pyrt.Config{Log: testLog})
	if err != nil {
		fmt.Fprintln(os.Stderr, "cannot start Python:", err)
		os.Exit(1)
	}
	os.Exit(m.Run())
}

// parentRole is a stand-in for ephysd in TestWorkerEndsWithParent: it
// starts an isolated stage, prints its worker's pid and waits to be killed.
const parentRole = "isolated-test-parent"

func parentMain(module string) int {
	s, err := NewStage(Config{Stage: pyrt.StageConfig{ID: 1, Path: module, Channels: 1, SampleRate: 30000}, Command: workerCommand})
	if s == nil {
		fmt.Println("error:", err)
		return 1
	}
	fmt.Println(s.PID())
	select {}
}

// workerCommand re-executes this test binary as a worker.
func workerCommand() (*exec.Cmd, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(exe)
	cmd.Env = append(os.Environ(), reexecEnv+"="+WorkerRole)
	return cmd, nil
}

var (
	idMu   sync.Mutex
	nextID = 300
)

func newID() int {
	idMu.Lock()
	defer idMu.Unlock()
	nextID++
	return nextID
}

func writeModule(t testing.TB, dir, name, src string) string {
	t.Helper()
	if dir == "" {
		dir = t.TempDir()
	}
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, []byte(src), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// newIsolated starts an isolated stage on module path; adjust may change
// the configuration first. The stage is closed at the end of the test.
func newIsolated(t testing.TB, path string, channels int, adjust func(*Config)) *Stage {
	t.Helper()
	id := newID()
	cfg := Config{
		Stage: pyrt.StageConfig{ID: id, Name: fmt.Sprintf("%s#%d", strings.TrimSuffix(filepath.Base(path), ".py"), id),
			Path: path, Channels: channels, SampleRate: 30000},
		Command: workerCommand,
		Log:     testLog,
	}
	if adjust != nil {
		adjust(&cfg)
	}
	s, err := NewStage(cfg)
	if s == nil {
		t.Fatalf("NewStage: %v", err)
	}
	if err != nil {
		t.Logf("NewStage: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// testSource makes blocks whose sample i of channel c is c*1000 + sample
// number (mod 997), digital line 0 high for samples [5, 25) of each 40,
// and one spike per block. It ends after blocks blocks, or, with until
// set, when until says so (or after a generous hang guard); with pace set,
// it delivers one block per pace.
type testSource struct {
	blocks int
	until  func() bool
	pace   time.Duration
	spikes bool

	n       int
	next    int64
	started time.Time
}

const hangGuard = 60 * time.Second

func (s *testSource) ReadBlock(b *pipeline.Block) error {
	if s.started.IsZero() {
		s.started = time.Now()
	}
	if s.until != nil {
		if s.until() || time.Since(s.started) > hangGuard {
			return io.EOF
		}
	} else if s.n == s.blocks {
		return io.EOF
	}
	if s.pace > 0 {
		time.Sleep(s.pace)
	}
	s.n++
	pyrttest.Fill(b, s.next)
	if s.spikes {
		b.Spikes = append(b.Spikes, pipeline.Spike{Processor: 100, Electrode: "Tetrode 1", SampleNumber: s.next + 3, SortedID: s.n % 3,
			Channels: 2, Samples: 3, Waveform: []float32{1, 2, float32(s.n), -4, -5, -6}})
	}
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
	spikes [][]pipeline.Spike
}

func (c *collector) Consume(b *pipeline.Block) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.data = append(c.data, append([]float32(nil), b.Data[:b.Channels*b.Samples]...))
	c.first = append(c.first, b.FirstSample)
	c.events = append(c.events, append([]pipeline.Event(nil), b.Events...))
	var sp []pipeline.Spike
	for _, s := range b.Spikes {
		s.Waveform = append([]float32(nil), s.Waveform...)
		sp = append(sp, s)
	}
	c.spikes = append(c.spikes, sp)
	return nil
}

func (c *collector) End() error { return nil }

func (c *collector) blocks() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.data)
}

type runOptions struct {
	channels, samples int
	source            *testSource
	executor          pipeline.Executor
	recording         *pipeline.Recording
	live              bool // no backpressure: a late stage drops blocks
	col               *collector
}

// runPipeline runs stages over the source through a real runner and
// returns what reached the consumer, and the runner's counters.
func runPipeline(t testing.TB, o runOptions, stages ...pipeline.Stage) (*collector, pipeline.Stats) {
	t.Helper()
	depth := 64
	if o.live {
		depth = 2000
	}
	pool, err := pipeline.NewPool(pipeline.PoolSizeFor(depth, false), o.channels, o.samples)
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close(true)
	col := o.col
	if col == nil {
		col = &collector{}
	}
	r, err := pipeline.NewRunner(pipeline.RunnerConfig{
		Source: o.source, SourceID: 100, Pool: pool, Stages: stages, Consumers: []pipeline.Consumer{col},
		QueueDepth: depth, Backpressure: !o.live, Executor: o.executor, Log: testLog,
	})
	if err != nil {
		t.Fatal(err)
	}
	if o.recording != nil {
		r.StartRecording(o.recording)
	}
	if err := r.Start(); err != nil {
		t.Fatal(err)
	}
	if err := r.Wait(); err != nil {
		t.Fatal(err)
	}
	return col, r.Stats()
}

// waitFor polls cond until it holds or a generous hang guard expires.
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(hangGuard)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("gave up waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
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
