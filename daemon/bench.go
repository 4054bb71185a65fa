package daemon

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/ephysd/ephysd/pipeline"
	"github.com/ephysd/ephysd/pyrt"
)

const passThroughModule = `class PyProcessor:
    def __init__(self, processor, num_channels, sample_rate):
        pass
    def process(self, data):
        pass
`

// benchParts are the parts of `ephysd bench`, in the order they run.
var benchParts = []string{"latency", "throughput", "python", "recorder", "footprint", "calls", "isolation", "spikes"}

const benchUsage = `Usage: ephysd bench [flags] [latency|throughput|python|recorder|footprint|calls|isolation|spikes|all …]

Measures ephysd's performance figures in one run and prints them as tables
(default: all parts, under 10 minutes on 2 cores):

  latency     closed-loop latency (threshold crossing → TTL event), by block size
  throughput  largest channel count at 30 kHz with zero overruns, recording on,
              found by binary search (probes of --probe; --long: 60 s)
  python      one module over the same blocks inside ephysd and in a bare
              Python loop: ratio and per-call overhead
  recorder    Open Ephys recorder against a plain sequential write of the same
              volume to the same disk: MB/s, ratio, CPU per MB
  footprint   RSS and CPU% of an ephysd process at 32 and 384 channels × 30 kHz
  calls       Go→Python call overhead, Go allocations per block, process speed
  isolation   per-block cost of a stage in a worker process (isolation =
              "process") against the same stage in ephysd, 64 and 384 channels
  spikes      the built-in spike detector: CPU per block and share of one core
              at 384 channels (raw and high-passed) and 32 channels × 1 sample

Flags:
`

// benchCommand runs `ephysd bench`: the performance suite of
// docs/PERFORMANCE.md, every figure measured in this one run.
func benchCommand(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("ephysd bench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprint(stderr, benchUsage)
		fs.PrintDefaults()
	}
	quick := fs.Bool("quick", false, "tiny durations: checks that every part works, figures are rough")
	long := fs.Bool("long", false, "the full runs: 60 s throughput probes, 10000 latency events, 60 s recorder volume, 30 s footprint runs")
	events := fs.Int("events", 0, "latency events per block size (default 2000; --quick 50, --long 10000)")
	probeFlag := fs.String("probe", "", "duration of each throughput probe (default 15s; --quick 1s, --long 60s)")
	writeDoc := fs.String("write-doc", "auto", `write the results into this Markdown file ("auto": docs/PERFORMANCE.md after a full run from the repository root; "" or "none": do not write)`)
	png := fs.String("png", "", "write the latency histogram to this PNG file")
	examples := fs.String("examples", "examples", "folder holding bandpass_filter.py")
	scratch := fs.String("dir", "", "folder for the recordings the bench makes (default $TMPDIR); the recorder figures are for its disk")
	seconds := fs.Float64("seconds", 10, "calls: seconds of 384-channel data per process run")
	calls := fs.Int("calls", 20000, "calls: Python calls for the overhead figure")
	blocks := fs.String("blocks", "1,4,30", "latency: block sizes in samples, comma-separated")
	conditions := fs.String("conditions", "idle,hog", "latency: conditions, comma-separated: idle, hog (recording on plus a CPU hog)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *quick && *long {
		return usageError{errors.New("bench: --quick and --long exclude each other")}
	}
	parts, err := benchSelect(fs.Args())
	if err != nil {
		return err
	}
	probe, err := parseDuration("probe", *probeFlag)
	if err != nil {
		return err
	}
	blockSizes, latConds, err := parseLatencyFlags(*blocks, *conditions)
	if err != nil {
		return usageError{err}
	}
	o := defaultSuiteOptions()
	switch {
	case *quick:
		o = quickSuiteOptions()
	case *long:
		o = longSuiteOptions()
	}
	if *events > 0 {
		o.Events = *events
	}
	if probe > 0 {
		o.Probe = probe
	}
	if *quick {
		*seconds, *calls = 1, 2000
	}
	o.PNG = *png

	bandpass, err := filepath.Abs(filepath.Join(*examples, "bandpass_filter.py"))
	if err != nil {
		return err
	}
	if _, err := os.Stat(bandpass); err != nil {
		return fmt.Errorf("bench: %s not found (run from the repository root or pass --examples)", bandpass)
	}
	tmp, err := os.MkdirTemp(*scratch, "ephysd-bench")
	if err != nil {
		return fmt.Errorf("bench: scratch folder: %w (pass --dir)", err)
	}
	defer os.RemoveAll(tmp)
	pass := filepath.Join(tmp, "passthrough.py")
	if err := os.WriteFile(pass, []byte(passThroughModule), 0o644); err != nil {
		return err
	}
	o.Dir = tmp
	o.Modules = []BenchModule{{Name: "pass-through", Path: pass}, {Name: "bandpass_filter.py", Path: bandpass}}
	o.Progress = stderr
	if o.Exe, err = os.Executable(); err != nil {
		return err
	}
	log := zap.NewNop()
	o.Log = log
	rt, err := pyrt.Start(pyrt.Config{Log: log})
	if err != nil {
		return err
	}
	o.Python = rt.Interpreter().Executable
	machine := describeMachine(rt, tmp)
	started := time.Now()

	var (
		section = func(name string) { fmt.Fprintf(stdout, "\n== %s ==\n", name) }
		res     suiteResults
	)
	fmt.Fprintf(stdout, "ephysd bench %s — %s\n", strings.Join(args, " "), machine.oneLine())
	fmt.Fprintf(stdout, "settings: %s\n", o.describe())
	for _, part := range parts {
		t0 := time.Now()
		fmt.Fprintf(stderr, "bench: %s…\n", part)
		switch part {
		case "latency":
			section("closed-loop latency")
			res.Latency, err = BenchLatency(LatencyOptions{
				Events: o.Events, PNG: o.PNG, Module: filepath.Join(*examples, "threshold_ttl.py"),
				BlockSizes: blockSizes, Conditions: latConds, Log: log, Progress: stderr,
			})
			if err == nil {
				PrintLatency(stdout, res.Latency)
				res.ran = append(res.ran, part)
			}
		case "throughput":
			section(fmt.Sprintf("throughput (%s probes, 30 kHz, recording on)", o.Probe))
			res.Throughput, err = BenchThroughput(o.throughputOptions())
			if err == nil {
				for _, t := range throughputTables(res.Throughput, o.Probe) {
					t.text(stdout)
				}
				res.ran = append(res.ran, part)
			}
		case "python":
			section("Python overhead")
			res.Python, err = BenchPython(o.pythonOptions(rt))
			if err == nil {
				pythonTable(res.Python).text(stdout)
				res.ran = append(res.ran, part)
			}
		case "recorder":
			section("recorder")
			var r RecorderResult
			r, err = BenchRecorder(o.recorderOptions())
			if err == nil {
				res.Recorder = &r
				recorderTable(r).text(stdout)
				res.ran = append(res.ran, part)
			}
		case "footprint":
			section("footprint")
			res.Footprint, err = BenchFootprint(o.footprintOptions())
			if err == nil {
				footprintTable(res.Footprint, o.Footprint).text(stdout)
				res.ran = append(res.ran, part)
			}
		case "calls":
			section("calls")
			var c CallsResult
			c, err = benchCalls(rt, tmp, pass, bandpass, *seconds, *calls, log)
			if err == nil {
				res.Calls = &c
				callsTable(c).text(stdout)
				res.ran = append(res.ran, part)
			}
		case "spikes":
			section("spike detector")
			res.Spikes, err = BenchSpikes(o.SpikeSeconds)
			if err == nil {
				spikesTable(res.Spikes, o.SpikeSeconds).text(stdout)
				res.ran = append(res.ran, part)
			}
		case "isolation":
			section("isolated Python stages")
			res.Isolation, err = BenchIsolation(o.isolationOptions(rt))
			if err == nil {
				isolationTable(res.Isolation).text(stdout)
				res.ran = append(res.ran, part)
			}
		}
		if err != nil {
			return fmt.Errorf("bench %s: %w", part, err)
		}
		fmt.Fprintf(stderr, "bench: %s took %s\n", part, time.Since(t0).Round(100*time.Millisecond))
	}
	res.Took = time.Since(started)
	machine.LoadEnd = loadAverage()
	goals := res.goals()
	if len(goals.Rows) > 0 {
		section("goals")
		goals.text(stdout)
	}
	fmt.Fprintf(stdout, "\nbench: %s in %s\n", strings.Join(res.ran, ", "), res.Took.Round(time.Second))

	doc := *writeDoc
	if doc == "auto" {
		doc = ""
		if !*quick && len(parts) == len(benchParts) && isRepoRoot() {
			doc = filepath.Join("docs", "PERFORMANCE.md")
		}
	}
	if doc != "" && doc != "none" {
		cmd := "ephysd bench"
		if len(args) > 0 {
			cmd += " " + strings.Join(args, " ")
		}
		if err := writePerformanceDoc(doc, cmd, machine, o, &res); err != nil {
			return err
		}
		fmt.Fprintf(stdout, "bench: wrote the results into %s\n", doc)
	}
	return nil
}

// parseLatencyFlags reads --blocks and --conditions.
func parseLatencyFlags(blocks, conditions string) ([]int, []string, error) {
	var sizes []int
	for _, f := range strings.Split(blocks, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 1 || n > 1024 {
			return nil, nil, fmt.Errorf("bench: --blocks %q: give block sizes of 1–1024 samples, comma-separated", blocks)
		}
		sizes = append(sizes, n)
	}
	var conds []string
	for _, f := range strings.Split(conditions, ",") {
		switch strings.TrimSpace(f) {
		case "idle":
			conds = append(conds, LatencyIdle)
		case "hog":
			conds = append(conds, LatencyHog)
		default:
			return nil, nil, fmt.Errorf("bench: --conditions %q: use idle, hog or idle,hog", conditions)
		}
	}
	return sizes, conds, nil
}

// benchSelect turns the command line's part names into the parts to run,
// in their fixed order.
func benchSelect(names []string) ([]string, error) {
	if len(names) == 0 {
		return benchParts, nil
	}
	want := map[string]bool{}
	for _, n := range names {
		if n == "all" {
			return benchParts, nil
		}
		found := false
		for _, p := range benchParts {
			found = found || p == n
		}
		if !found {
			return nil, usageError{fmt.Errorf("bench: unknown part %q (use %s or all)", n, strings.Join(benchParts, ", "))}
		}
		want[n] = true
	}
	var out []string
	for _, p := range benchParts {
		if want[p] {
			out = append(out, p)
		}
	}
	return out, nil
}

// isRepoRoot reports whether the working directory is ephysd's repository.
func isRepoRoot() bool {
	mod, err := os.ReadFile("go.mod")
	return err == nil && bytes.Contains(mod, []byte("module github.com/ephysd/ephysd\n")) && dirExists("docs")
}

func dirExists(p string) bool {
	st, err := os.Stat(p)
	return err == nil && st.IsDir()
}

// CallsResult holds the figures of the calls part: the cost of a block's
// trip into Python, Go allocations on the hot path, and the speed of
// `ephysd process` at 384 channels.
type CallsResult struct {
	Calls    int
	Overhead []CallOverhead
	Allocs   float64 // Go heap allocations per block, sim → Python → recorder
	Blocks   uint64  // blocks the allocation figure counts
	Seconds  float64 // seconds of data per process run
	Process  []ProcessSpeed
}

// CallOverhead is the time of Stage.Process for an empty process().
type CallOverhead struct {
	Channels, Samples int
	P50, P99, Max     time.Duration
}

// ProcessSpeed is one `ephysd process` run as fast as possible.
type ProcessSpeed struct {
	Module             string
	Speed              float64 // × real time
	StageP50, StageP99 time.Duration
	Blocks, Overruns   uint64
}

func benchCalls(rt *pyrt.Runtime, tmp, pass, bandpass string, seconds float64, calls int, log *zap.Logger) (CallsResult, error) {
	res := CallsResult{Calls: calls, Seconds: seconds}
	for _, shape := range [][2]int{{32, 30}, {384, 30}} {
		p50, p99, max, err := callOverhead(rt, pass, shape[0], shape[1], calls)
		if err != nil {
			return res, err
		}
		res.Overhead = append(res.Overhead, CallOverhead{Channels: shape[0], Samples: shape[1], P50: p50, P99: p99, Max: max})
	}
	var err error
	res.Allocs, res.Blocks, err = hotPathAllocs(tmp, pass)
	if err != nil {
		return res, err
	}
	for _, m := range []struct{ name, path string }{{"pass-through", pass}, {"bandpass_filter.py", bandpass}} {
		c, err := benchProcess(filepath.Join(tmp, "rec"), m.path, 384, 30000, seconds, log)
		if err != nil {
			return res, err
		}
		st := c.Runner.Stats()
		h := c.Runner.StageTime(0)
		res.Process = append(res.Process, ProcessSpeed{
			Module: m.name, Speed: float64(st.Samples) / 30000 / c.Elapsed().Seconds(),
			StageP50: h.Quantile(0.5), StageP99: h.Quantile(0.99), Blocks: st.Processed, Overruns: st.OverrunBlocks,
		})
		os.RemoveAll(filepath.Join(tmp, "rec"))
	}
	return res, nil
}

func callsTable(c CallsResult) benchTable {
	t := benchTable{Title: "Go→Python calls, allocations, process speed", Header: []string{"figure", "result"}}
	for _, o := range c.Overhead {
		t.add(fmt.Sprintf("Go→Python call, empty process(), %d ch × %d samples", o.Channels, o.Samples),
			fmt.Sprintf("p50 %s, p99 %s, max %s (%d calls)", fmtDur(o.P50), fmtDur(o.P99), fmtDur(o.Max), c.Calls))
	}
	t.add("Go allocations per block, sim → Python → recorder, 32 ch", fmt.Sprintf("%.4f (%d blocks)", c.Allocs, c.Blocks))
	for _, p := range c.Process {
		t.add(fmt.Sprintf("ephysd process, 384 ch × 30 kHz, %s, recording, as fast as possible", p.Module),
			fmt.Sprintf("%.1f× real time (python p50 %s, p99 %s per 1 ms block; %d blocks, %d overruns)",
				p.Speed, fmtDur(p.StageP50), fmtDur(p.StageP99), p.Blocks, p.Overruns))
	}
	return t
}

// callOverhead times Stage.Process on the interpreter thread for a module
// whose process does nothing: the cost of a block's trip into Python and
// back, including the zero-copy array.
func callOverhead(rt *pyrt.Runtime, module string, channels, samples, n int) (p50, p99, max time.Duration, err error) {
	st, err := rt.NewStage(pyrt.StageConfig{ID: 900 + channels, Name: fmt.Sprintf("bench%d", channels), Path: module, Channels: channels, SampleRate: 30000})
	if err != nil {
		return 0, 0, 0, err
	}
	pool, err := pipeline.NewPool(1, channels, samples)
	if err != nil {
		return 0, 0, 0, err
	}
	defer pool.Close(st.Retained())
	b := pool.TryGet()
	defer b.Release()
	var h pipeline.Histogram
	rt.Do(func() {
		st.StartAcquisition()
		for i := 0; i < n/10; i++ { // warm up
			st.Process(b)
		}
		for i := 0; i < n; i++ {
			t0 := time.Now()
			st.Process(b)
			h.Record(time.Since(t0))
		}
		st.StopAcquisition()
	})
	return h.Quantile(0.5), h.Quantile(0.99), h.Max(), nil
}

// hotPathAllocs counts Go heap allocations per block over a steady run of
// the full chain (sim, a Python stage, the recorder).
func hotPathAllocs(tmp, module string) (float64, uint64, error) {
	cfg, err := ParseConfig(filepath.Join(tmp, "bench.toml"), []byte(fmt.Sprintf(`
[source]
driver = "sim"
[source.sim]
channels = 32
realtime = false
[[stage]]
module = %q
[recording]
parent_directory = "allocs"
`, module)))
	if err != nil {
		return 0, 0, err
	}
	c, err := NewChain(cfg, zap.NewNop())
	if err != nil {
		return 0, 0, err
	}
	if _, err := c.StartRecording(); err != nil {
		return 0, 0, err
	}
	if err := c.Start(); err != nil {
		return 0, 0, err
	}
	defer os.RemoveAll(filepath.Join(tmp, "allocs"))
	time.Sleep(500 * time.Millisecond) // past start-up
	var m0, m1 runtime.MemStats
	runtime.ReadMemStats(&m0)
	b0 := c.Runner.Stats().Processed
	time.Sleep(2 * time.Second)
	runtime.ReadMemStats(&m1)
	b1 := c.Runner.Stats().Processed
	if err := c.Stop(); err != nil {
		return 0, 0, err
	}
	if b1 == b0 {
		return 0, 0, errors.New("bench: no blocks went through the chain")
	}
	return float64(m1.Mallocs-m0.Mallocs) / float64(b1-b0), b1 - b0, nil
}

func benchProcess(out, module string, channels int, rate, seconds float64, log *zap.Logger) (*Chain, error) {
	cfg, err := ParseConfig(filepath.Join(out, "bench.toml"), []byte(fmt.Sprintf(`
[source]
driver = "sim"
[source.sim]
channels = %d
rate = %d
realtime = false
[[stage]]
module = %q
[recording]
parent_directory = %q
`, channels, int(rate), module, out)))
	if err != nil {
		return nil, err
	}
	return Process(context.Background(), cfg, log, time.Duration(seconds*float64(time.Second)), nil)
}
