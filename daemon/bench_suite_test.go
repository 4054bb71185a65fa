package daemon

import (
	"bytes"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/ephysd/ephysd/pyrt"
)

// The suite's parts with tiny sizes: each must produce sane, positive
// figures. No test here bounds a time: these machines are noisy.

func benchModules(t *testing.T) []BenchModule {
	t.Helper()
	pass := filepath.Join(t.TempDir(), "passthrough.py")
	if err := os.WriteFile(pass, []byte(passThroughModule), 0o644); err != nil {
		t.Fatal(err)
	}
	return []BenchModule{{Name: "pass-through", Path: pass}, {Name: "bandpass_filter.py", Path: mustAbs(t, "../examples/bandpass_filter.py")}}
}

func TestBenchSelect(t *testing.T) {
	for _, c := range []struct {
		args []string
		want []string
	}{
		{nil, benchParts},
		{[]string{"all"}, benchParts},
		{[]string{"calls", "throughput"}, []string{"throughput", "calls"}},
	} {
		got, err := benchSelect(c.args)
		if err != nil || !slices.Equal(got, c.want) {
			t.Errorf("benchSelect(%q) = %q, %v; want %q", c.args, got, err, c.want)
		}
	}
	if _, err := benchSelect([]string{"speed"}); err == nil {
		t.Error("benchSelect accepted an unknown part")
	}
}

func TestLatencyFlags(t *testing.T) {
	sizes, conds, err := parseLatencyFlags("1, 4", "hog")
	if err != nil || !slices.Equal(sizes, []int{1, 4}) || !slices.Equal(conds, []string{LatencyHog}) {
		t.Fatalf("got %v %q %v", sizes, conds, err)
	}
	for _, c := range [][2]string{{"0", "idle"}, {"1,x", "idle"}, {"2000", "idle"}, {"1", "busy"}, {"", "idle"}} {
		if _, _, err := parseLatencyFlags(c[0], c[1]); err == nil {
			t.Errorf("--blocks %q --conditions %q accepted", c[0], c[1])
		}
	}
	var out, errOut bytes.Buffer
	if err := benchCommand([]string{"--blocks", "0", "latency"}, &out, &errOut); err == nil || !strings.Contains(err.Error(), "--blocks") {
		t.Fatalf("bench --blocks 0: %v", err)
	}
}

func TestBenchThroughputQuick(t *testing.T) {
	rs, err := BenchThroughput(ThroughputOptions{
		Modules: benchModules(t), Min: 16, Max: 32, Step: 16, Rate: 30000,
		Probe: 500 * time.Millisecond, Dir: t.TempDir(),
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(rs) != 2 {
		t.Fatalf("%d results, want 2", len(rs))
	}
	for _, r := range rs {
		if len(r.Probes) == 0 || len(r.Probes) > 2 {
			t.Errorf("%s: %d probes for a grid of 2", r.Module, len(r.Probes))
		}
		for _, p := range r.Probes {
			if p.Bytes == 0 || !(p.CPUPercent > 0) || p.Channels <= 0 {
				t.Errorf("%s: probe %+v: nothing recorded or no CPU used", r.Module, p)
			}
			if p.Pass != (p.Why == "") {
				t.Errorf("%s: probe %+v: verdict and reason disagree", r.Module, p)
			}
		}
		if r.Largest != 0 && !slices.ContainsFunc(r.Probes, func(p ThroughputProbe) bool { return p.Pass && p.Channels == r.Largest }) {
			t.Errorf("%s: largest %d is not a passing probe", r.Module, r.Largest)
		}
		if r.FirstFail != nil && (r.FirstFail.Pass || r.FirstFail.Channels <= r.Largest) {
			t.Errorf("%s: first failure %+v after largest %d", r.Module, *r.FirstFail, r.Largest)
		}
		if r.AllPassed != (r.FirstFail == nil) {
			t.Errorf("%s: all passed %v but first failure %v", r.Module, r.AllPassed, r.FirstFail)
		}
	}
	var out bytes.Buffer
	for _, tb := range throughputTables(rs, 500*time.Millisecond) {
		tb.text(&out)
	}
	if !strings.Contains(out.String(), "bandpass_filter.py") {
		t.Errorf("table lacks the module:\n%s", out.String())
	}
}

func TestBenchPythonQuick(t *testing.T) {
	rt, err := pyrt.Start(pyrt.Config{})
	if err != nil {
		t.Fatal(err)
	}
	rs, err := BenchPython(PythonOptions{Runtime: rt, Modules: benchModules(t), Channels: 64, Samples: 30, Rate: 30000,
		Calls: 100, Rounds: 2, Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	if len(rs) != 2 {
		t.Fatalf("%d results, want 2", len(rs))
	}
	for _, r := range rs {
		if r.Calls != 200 {
			t.Errorf("%s: %d calls, want 200", r.Module, r.Calls)
		}
		for _, d := range []time.Duration{r.Ephysd.P50, r.Ephysd.Mean, r.Bare.P50, r.Bare.Mean} {
			if d <= 0 {
				t.Errorf("%s: a time is not positive: %+v", r.Module, r)
			}
		}
		if !(r.RatioMean > 0) || math.IsInf(r.RatioMean, 0) || !(r.RatioP50 > 0) {
			t.Errorf("%s: ratio %v / %v", r.Module, r.RatioMean, r.RatioP50)
		}
		if r.Overhead != r.Ephysd.Mean-r.Bare.Mean {
			t.Errorf("%s: overhead %s is not the difference of the means", r.Module, r.Overhead)
		}
		if r.PythonVersion == "" || r.NumpyV == "" {
			t.Errorf("%s: the bare loop did not report its versions", r.Module)
		}
	}
	// The filter does work, the pass-through none: the bare loop sees it.
	if rs[1].Bare.Mean <= rs[0].Bare.Mean {
		t.Errorf("bare loop: bandpass mean %s not above pass-through %s", rs[1].Bare.Mean, rs[0].Bare.Mean)
	}
}

func TestBenchRecorderQuick(t *testing.T) {
	r, err := BenchRecorder(RecorderOptions{Channels: 64, Rate: 30000, BlockSamples: 30, Seconds: 0.5, Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	dat := uint64(0.5 * 30000 * 64 * 2) // continuous.dat alone
	if r.Bytes < dat || r.Bytes > 2*dat {
		t.Errorf("recorded %d bytes for %d bytes of samples", r.Bytes, dat)
	}
	for _, w := range []WriteRun{r.Recorder, r.Plain} {
		if w.Wall <= 0 || w.CPU < 0 || !(w.MBps(r.Bytes) > 0) {
			t.Errorf("write run %+v", w)
		}
	}
	if !(r.Ratio() > 0) || !(r.RealTime() > 0) {
		t.Errorf("ratio %v, real time %v", r.Ratio(), r.RealTime())
	}
	if r.Disk == "" || r.Disk == "unknown" {
		t.Errorf("disk %q", r.Disk)
	}
}

func TestBenchFootprintQuick(t *testing.T) {
	if _, err := exec.LookPath("go"); err != nil {
		t.Skip("no go command to build ephysd with")
	}
	bin := filepath.Join(t.TempDir(), "ephysd")
	if out, err := exec.Command("go", "build", "-o", bin, "../cmd/ephysd").CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	mods := benchModules(t)
	rs, err := BenchFootprint(FootprintOptions{Exe: bin, Modules: mods[:1], Channels: []int{32}, Rate: 30000,
		Duration: 1500 * time.Millisecond, Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	if len(rs) != 1 {
		t.Fatalf("%d results, want 1", len(rs))
	}
	r := rs[0]
	if r.RSS < 1<<20 || r.PeakRSS < r.RSS || !(r.CPUPercent > 0) || r.Channels != 32 {
		t.Errorf("footprint %+v", r)
	}
}

func TestProcStats(t *testing.T) {
	ticks, ok1 := procTicks(os.Getpid())
	rss, hwm, ok2 := procRSS(os.Getpid())
	if !ok1 || !ok2 || rss == 0 || hwm < rss {
		t.Errorf("own /proc: ticks %d (%v), rss %d, peak %d (%v)", ticks, ok1, rss, hwm, ok2)
	}
	if _, _, ok := procRSS(-1); ok {
		t.Error("procRSS of no process succeeded")
	}
}

// TestBenchCommandWritesDoc runs `ephysd bench --quick` on two parts and
// checks the tables and the doc section, which a second run replaces while
// the text around it stays.
func TestBenchCommandWritesDoc(t *testing.T) {
	doc := filepath.Join(t.TempDir(), "PERFORMANCE.md")
	if err := os.WriteFile(doc, []byte("# Performance\n\nIntro.\n\n"+docBegin+"\nold results\n"+docEnd+"\n\n## History\n\nOld figures.\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	for run := 0; run < 2; run++ {
		var stdout, stderr bytes.Buffer
		err := benchCommand([]string{"--quick", "--examples", "../examples", "--dir", t.TempDir(), "--write-doc", doc, "python", "recorder"}, &stdout, &stderr)
		if err != nil {
			t.Fatalf("%v\n%s", err, stderr.String())
		}
		for _, want := range []string{"Python overhead", "ratio (mean)", "plain os.File writes", "== goals =="} {
			if !strings.Contains(stdout.String(), want) {
				t.Errorf("output lacks %q:\n%s", want, stdout.String())
			}
		}
	}
	b, err := os.ReadFile(doc)
	if err != nil {
		t.Fatal(err)
	}
	s := string(b)
	for _, want := range []string{"# Performance\n\nIntro.", "## History\n\nOld figures.", "### Python overhead", "### Recorder", "### Anchors",
		"Falcon", "**Machine.**", "ephysd bench --quick", "| module | calls |"} {
		if !strings.Contains(s, want) {
			t.Errorf("doc lacks %q:\n%s", want, s)
		}
	}
	if strings.Count(s, docBegin) != 1 || strings.Contains(s, "old results") {
		t.Errorf("the results section was not replaced exactly once:\n%s", s)
	}
}
