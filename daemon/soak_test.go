package daemon

import (
	"bytes"
	"context"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// progressLog sends the soak's progress lines to the test log.
type progressLog struct{ t *testing.T }

func (w progressLog) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// goal finds the goal whose name starts with prefix.
func goal(t *testing.T, r *SoakReport, prefix string) soakGoal {
	t.Helper()
	for _, g := range r.Goals() {
		if strings.HasPrefix(g.Name, prefix) {
			return g
		}
	}
	t.Fatalf("no goal %q in %+v", prefix, r.Goals())
	return soakGoal{}
}

// series samples f every step over run.
func series(run, step time.Duration, f func(at time.Duration) float64) []point {
	var s []point
	for at := time.Duration(0); at <= run; at += step {
		s = append(s, point{at, f(at)})
	}
	return s
}

// The drift statistics: a flat series with noise and short spikes (a
// garbage collection, a page-cache blip) stays within the goal; a series
// that grows 2 % over the steady part is caught; a series too short for its
// windows is "not measured", never "met".
func TestSoakDriftStatistics(t *testing.T) {
	run := 10 * time.Minute
	warmUp, window := soakWindows(run, -1)
	if warmUp != time.Minute || window != time.Minute {
		t.Fatalf("10 min run: warm-up %s, window %s; want 1m, 1m", warmUp, window)
	}
	// Deterministic noise of ±0.3 % and a 30 % spike every minute, on the
	// first sample of the first window and the last of the last; warm-up
	// grows from 150 to 200 MB.
	noise := func(at time.Duration) float64 { return 0.003 * math.Sin(float64(at/time.Second)*1.7) }
	spike := func(at time.Duration) float64 {
		if (at/time.Second)%60 == 0 {
			return 0.3
		}
		return 0
	}
	flat := series(run, time.Second, func(at time.Duration) float64 {
		if at < warmUp {
			return 150e6 + 50e6*at.Seconds()/warmUp.Seconds()
		}
		return 200e6 * (1 + noise(at) + spike(at))
	})
	s := steadyOf(flat, warmUp, window, run)
	if !s.Measured() || s.NStart != 60 || s.NEnd != 61 {
		t.Fatalf("flat: %+v", s)
	}
	t.Logf("flat: drift %.4f %%", s.DriftPct())
	if d := s.DriftPct(); math.Abs(d) > 0.2 {
		t.Errorf("flat series with noise and spikes: drift %.3f %%, want ≈ 0", d)
	}
	if s.Max < 200e6*1.29 {
		t.Errorf("max %.0f misses the spikes", s.Max)
	}

	// 2 % over the 9 minutes after warm-up: the medians of the windows are
	// 1.5 min apart from the ends, so the drift is 2 % × 8 / 9.
	growing := series(run, time.Second, func(at time.Duration) float64 {
		g := max(at-warmUp, 0).Seconds() / (run - warmUp).Seconds()
		return 200e6 * (1 + 0.02*g + noise(at) + spike(at))
	})
	g := steadyOf(growing, warmUp, window, run)
	if d := g.DriftPct(); d < 1.6 || d > 1.95 {
		t.Errorf("2 %% growth: drift %.3f %%, want ≈ 1.78", d)
	}
	r := goodReport()
	r.RSS = s
	if gl := goal(t, r, "RSS drift"); !gl.Met {
		t.Errorf("flat RSS: %+v", gl)
	}
	r.RSS = g
	if gl := goal(t, r, "RSS drift"); gl.Met || !strings.Contains(gl.Measured, "+1.") {
		t.Errorf("growing RSS: %+v", gl)
	}
	if !r.Failed() {
		t.Error("a growing RSS does not fail the soak")
	}

	// Too short: 2 samples per window.
	short := steadyOf(series(10*time.Second, 2*time.Second, func(time.Duration) float64 { return 1 }), 2*time.Second, 3*time.Second, 10*time.Second)
	if short.Measured() || short.Flat(100) {
		t.Errorf("a series of 2 samples per window counts as measured: %+v", short)
	}
	r.RSS = short
	if gl := goal(t, r, "RSS drift"); gl.Met || !strings.Contains(gl.Measured, "not measured") {
		t.Errorf("unmeasured RSS: %+v", gl)
	}
}

func TestSoakWindows(t *testing.T) {
	for _, c := range []struct {
		run, gc, warmUp, window time.Duration
	}{
		{10 * time.Minute, -1, time.Minute, time.Minute},
		{60 * time.Minute, -1, 6 * time.Minute, time.Minute},
		{60 * time.Minute, 2*time.Minute + 5*time.Second, 6 * time.Minute, time.Minute},
		{10 * time.Minute, 2*time.Minute + 5*time.Second, 2*time.Minute + 5*time.Second, time.Minute},
		{15 * time.Second, -1, 3750 * time.Millisecond, 3750 * time.Millisecond},
		{2 * time.Minute, 2*time.Minute + time.Second, time.Minute, 20 * time.Second}, // a late collection: half the run at most
		{15 * time.Second, 11 * time.Second, 7500 * time.Millisecond, 2500 * time.Millisecond},
	} {
		w, win := soakWindows(c.run, c.gc)
		if w != c.warmUp || win != c.window {
			t.Errorf("run %s, GC at %s: warm-up %s, window %s; want %s, %s", c.run, c.gc, w, win, c.warmUp, c.window)
		}
	}
	gc := []point{{0, 7}, {5 * time.Second, 7}, {10 * time.Second, 7}, {15 * time.Second, 8}, {20 * time.Second, 9}}
	if at := firstIncrease(gc); at != 15*time.Second {
		t.Errorf("first GC at %s, want 15s", at)
	}
	if at := firstIncrease(gc[:3]); at != -1 {
		t.Errorf("no GC: %s, want -1", at)
	}
}

// Goroutines, threads and open files: a series that ends where it started
// (with a blip between) is flat; one that climbs is not.
func TestSoakFlatness(t *testing.T) {
	run := 10 * time.Minute
	warmUp, window := soakWindows(run, -1)
	blip := steadyOf(series(run, 5*time.Second, func(at time.Duration) float64 {
		if at > 5*time.Minute && at < 5*time.Minute+20*time.Second {
			return 40 // a burst of API connections
		}
		return 21
	}), warmUp, window, run)
	if !blip.Flat(soakGoroutineSlack) || blip.Max != 40 {
		t.Errorf("flat with a blip: %+v", blip)
	}
	leak := steadyOf(series(run, 5*time.Second, func(at time.Duration) float64 {
		return 21 + float64(at/(30*time.Second)) // one more every 30 s
	}), warmUp, window, run)
	if leak.Flat(soakGoroutineSlack) {
		t.Errorf("a leak of one goroutine every 30 s counts as flat: %+v", leak)
	}
	r := goodReport()
	r.Goroutines = leak
	if gl := goal(t, r, "goroutines flat"); gl.Met || gl.Measured != "23.5 → 40 (max 41)" {
		t.Errorf("leaking goroutines: %+v", gl)
	}
	r = goodReport()
	r.FDs = leak
	if goal(t, r, "open files flat").Met || !r.Failed() {
		t.Error("leaking files not caught")
	}
}

func TestSoakCPUAndQuantiles(t *testing.T) {
	// 37 ticks (10 ms each) per second: 37 % of one core; one second of 90.
	ticks := series(2*time.Minute, time.Second, func(at time.Duration) float64 {
		n := 37 * at.Seconds()
		if at >= 90*time.Second {
			n += 53
		}
		return n
	})
	mean, peak := cpuPercent(ticks, 30*time.Second, 2*time.Minute)
	if math.Abs(mean-37-53.0/90) > 0.01 || math.Abs(peak-90) > 0.01 {
		t.Errorf("cpu mean %.3f, max %.3f; want %.3f, 90", mean, peak, 37+53.0/90)
	}
	var d []time.Duration
	for i := 1; i <= 1000; i++ {
		d = append(d, time.Duration(i)*time.Microsecond)
	}
	if p50, p99 := durQuantile(d, 0.5), durQuantile(d, 0.99); p50 != 500*time.Microsecond || p99 != 990*time.Microsecond {
		t.Errorf("p50 %s, p99 %s", p50, p99)
	}
	if durQuantile(nil, 0.5) != 0 || median(nil) != 0 || median([]float64{3, 1, 2, 10}) != 2.5 {
		t.Error("empty quantile / median")
	}
	if !countClose(30000*600, 30000*600+20000, 30000) || countClose(30000*600, 30000*600+200000, 30000) ||
		!countClose(150000, 170000, 30000) || countClose(100000, 140000, 30000) {
		t.Error("countClose")
	}
	text := []byte("# HELP go_goroutines Number of goroutines.\n# TYPE go_goroutines gauge\ngo_goroutines 23\ngo_goroutines_x 1\ngo_gc_duration_seconds{quantile=\"0\"} 1e-05\ngo_gc_duration_seconds_count 12\n")
	if v, ok := metricValue(text, "go_goroutines"); !ok || v != 23 {
		t.Errorf("go_goroutines %v %v", v, ok)
	}
	if v, ok := metricValue(text, "go_gc_duration_seconds_count"); !ok || v != 12 {
		t.Errorf("gc count %v %v", v, ok)
	}
	if _, ok := metricValue(text, "go_threads"); ok {
		t.Error("found a metric that is not there")
	}
}

func TestSoakTimeline(t *testing.T) {
	var procs []soakProcSample
	for i := 0; i <= 100; i++ {
		procs = append(procs, soakProcSample{At: time.Duration(i) * time.Second, RSS: uint64(100e6 + i*1e5), Threads: 10, FDs: 19,
			Ticks: uint64(40 * i), Load: 1.5})
	}
	goroutines := []point{{5 * time.Second, 17}, {45 * time.Second, 18}, {95 * time.Second, 19}}
	overruns := []point{{0, 0}, {62 * time.Second, 30}}
	tl := soakTimeline(procs, goroutines, overruns, 100*time.Second, 10)
	if len(tl) != 10 {
		t.Fatalf("%d moments, want 10", len(tl))
	}
	m4, m10 := tl[3], tl[9]
	if m4.At != 40*time.Second || m4.RSS != 104e6 || m4.Goroutines != 17 || m4.Overruns != 0 || math.Abs(m4.CPU-40) > 0.01 {
		t.Errorf("at 40 s: %+v", m4)
	}
	if m10.RSS != 110e6 || m10.Goroutines != 19 || m10.Overruns != 30 || m10.Threads != 10 || m10.FDs != 19 {
		t.Errorf("at 100 s: %+v", m10)
	}
	var buf bytes.Buffer
	(&SoakReport{timeline: tl}).timelineTable().text(&buf)
	if !strings.Contains(buf.String(), "1m40s  110.0 MB  19") {
		t.Errorf("timeline table:\n%s", buf.String())
	}
}

// goodReport is a report that meets every goal.
func goodReport() *SoakReport {
	ok := Steady{Start: 20, End: 20, Max: 21, NStart: 60, NEnd: 60}
	return &SoakReport{
		Channels: 4, Rate: 30000, Requests: 100, Run: time.Minute, Duration: time.Minute,
		Segments: []*SoakSegment{{Path: "/x/experiment1/recording1", Wall: 10 * time.Second, Expect: 300000, Checked: true,
			Samples: 300010, NeoSamples: 300010, DatSamples: 300010, Timestamps: 300010, Channels: 4, TailStd: 12}},
		RSS:        Steady{Start: 200e6, End: 200.5e6, Max: 201e6, NStart: 60, NEnd: 60},
		Goroutines: ok, Threads: ok, FDs: ok,
	}
}

// Each goal turns NOT met by the fault it watches, and only that goal.
func TestSoakGoals(t *testing.T) {
	if r := goodReport(); r.Failed() {
		t.Fatalf("good report fails: %+v", r.Goals())
	}
	for _, c := range []struct {
		goal  string
		fault func(r *SoakReport)
	}{
		{"overruns", func(r *SoakReport) { r.Overruns, r.OverrunSamples = 2, 60 }},
		{"gaps in the recorded", func(r *SoakReport) { r.Segments[0].Gaps, r.Segments[0].Missing = 1, 30 }},
		{"source gaps", func(r *SoakReport) { r.SourceGaps = 1 }},
		{"source gaps", func(r *SoakReport) { r.Disconnects = 1 }},
		{"recordings read by neo", func(r *SoakReport) { r.Segments[0].DatSamples-- }},            // continuous.dat disagrees
		{"recordings read by neo", func(r *SoakReport) { r.Segments[0].TailStd = 0 }},             // zero-filled data
		{"recordings read by neo", func(r *SoakReport) { r.Segments[0].Channels = 3 }},            // wrong channel count
		{"recordings read by neo", func(r *SoakReport) { r.Segments[0].Expect = 400000 }},         // 3.3 s missing
		{"recordings read by neo", func(r *SoakReport) { r.Segments[0].Backwards = 1 }},           // sample numbers go back
		{"recordings read by neo", func(r *SoakReport) { r.Segments[0].Err = "neo: ValueError" }}, // unreadable
		{"failed API requests", func(r *SoakReport) { r.Failures = 1 }},
		{"failed API requests", func(r *SoakReport) { r.ModeFailures = 1 }},
		{"threads flat", func(r *SoakReport) { r.Threads.End = 24 }},
		{"the daemon records", func(r *SoakReport) { r.ExitErr = "exit status 1" }},
		{"the daemon records", func(r *SoakReport) { r.LeftRecord = "IDLE at 5m: the source ended" }},
	} {
		r := goodReport()
		c.fault(r)
		if !r.Failed() {
			t.Errorf("%s: not caught", c.goal)
		}
		for _, g := range r.Goals() {
			if g.Met == strings.HasPrefix(g.Name, c.goal) {
				t.Errorf("%s fault: goal %q met=%v (%s)", c.goal, g.Name, g.Met, g.Measured)
			}
		}
	}
	// An unchecked recording fails both recording goals.
	r := goodReport()
	r.Segments[0].Checked = false
	if goal(t, r, "gaps in the recorded").Met || goal(t, r, "recordings read by neo").Met {
		t.Error("an unchecked recording counts as checked")
	}
}

// The daemon's summary is parsed as printSummary writes it.
func TestSoakParsesRunSummary(t *testing.T) {
	c := process(t, `
[source]
driver = "sim"
[source.sim]
channels = 4
realtime = false
[recording]
parent_directory = "recs"
`, 200*time.Millisecond)
	var out bytes.Buffer
	printSummary(&out, c)
	var r SoakReport
	if !r.parseRunSummary(out.Bytes()) {
		t.Fatalf("summary not recognised:\n%s", out.String())
	}
	st := c.Runner.Stats()
	if r.Blocks != st.Blocks || r.Samples != st.Samples || r.Overruns != 0 || r.Samples != 6000 {
		t.Errorf("parsed blocks %d samples %d overruns %d; chain %+v\n%s", r.Blocks, r.Samples, r.Overruns, st, out.String())
	}
	faulty := []byte("blocks      10 read, 9 processed\nsamples     300 (0.010 s of data)\noverruns    3 blocks (90 samples dropped)\n" +
		"gaps        2 in the source (77 samples missing)\ndevice      disconnected 4 times (last: gone)\n")
	if !r.parseRunSummary(faulty) || r.Overruns != 3 || r.OverrunSamples != 90 || r.SourceGaps != 2 || r.GapSamples != 77 || r.Disconnects != 4 {
		t.Errorf("faulty summary parsed as %+v", r)
	}
	if r.parseRunSummary([]byte("ephysd: stop: the pipeline did not finish\n")) {
		t.Error("no summary parsed as one")
	}
}

// The doc writer puts the figures between markers at the end of the Soak
// section, replaces them on the next run and keeps everything else.
func TestSoakDocWriter(t *testing.T) {
	dir := t.TempDir()
	doc := filepath.Join(dir, "RELIABILITY.md")
	orig := "# Reliability\n\nIntro.\n\n## Device faults\n\nKept.\n\n## Soak\n\nHow the soak works.\n\n## Later\n\nAlso kept.\n"
	os.WriteFile(doc, []byte(orig), 0o644)
	r := goodReport()
	r.Started = time.Date(2026, 11, 21, 10, 0, 0, 0, time.UTC)
	if err := writeSoakDoc(doc, "ephysd soak --duration 1m", r); err != nil {
		t.Fatal(err)
	}
	got, _ := os.ReadFile(doc)
	s := string(got)
	b, e := strings.Index(s, soakDocBegin), strings.Index(s, soakDocEnd)
	if b < 0 || e < b || !strings.Contains(s[:b], "How the soak works.\n") || strings.Contains(s[:b], "## Later") ||
		!strings.HasSuffix(s, "## Later\n\nAlso kept.\n") || !strings.HasPrefix(s, "# Reliability\n\nIntro.\n\n## Device faults\n\nKept.\n\n## Soak\n") {
		t.Fatalf("doc:\n%s", s)
	}
	for _, want := range []string{"### Latest soak (2026-11-21)", "`ephysd soak --duration 1m`", "| overruns: 0 | 0 blocks (0 samples) | met |",
		"| RSS drift after warm-up ≤ 1 % | +0.25 % (200.0 MB → 200.5 MB) | met |", "experiment1/recording1", "**Machine.**", "Load average"} {
		if !strings.Contains(s[b:e], want) {
			t.Errorf("doc lacks %q:\n%s", want, s[b:e])
		}
	}
	r.Overruns = 5
	if err := writeSoakDoc(doc, "ephysd soak --duration 1m", r); err != nil {
		t.Fatal(err)
	}
	again, _ := os.ReadFile(doc)
	if strings.Count(string(again), soakDocBegin) != 1 || !strings.Contains(string(again), "| overruns: 0 | 5 blocks (0 samples) | NOT met |") ||
		string(again[:b]) != s[:b] || !strings.HasSuffix(string(again), "## Later\n\nAlso kept.\n") {
		t.Errorf("second write:\n%s", again)
	}
	// No Soak section: one is added at the end.
	other := filepath.Join(dir, "other.md")
	os.WriteFile(other, []byte("# Other\n\nText.\n"), 0o644)
	if err := writeSoakDoc(other, "ephysd soak", r); err != nil {
		t.Fatal(err)
	}
	o, _ := os.ReadFile(other)
	if !strings.HasPrefix(string(o), "# Other\n\nText.\n\n## Soak\n\n"+soakDocBegin) {
		t.Errorf("new section:\n%s", o)
	}
}

// TestSoakShort runs the soak machinery for real for 12 s: the daemon
// binary with 16 channels through the band-pass module, recordings cut
// every 4 s, the API polled, /proc sampled, every recording checked with
// neo. The counts must come out clean and the report complete. (The RSS
// drift of a 12 s run is the Go heap's warm-up: no verdict is asserted.)
func TestSoakShort(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the daemon for 12 s")
	}
	bin := buildBinary(t) // before t.Parallel: buildBinary is not safe for concurrent use
	t.Parallel()
	dir := t.TempDir()
	r, err := RunSoak(context.Background(), SoakOptions{
		Exe: bin, Duration: 12 * time.Second, Channels: 16, Module: mustAbs(t, "../examples/bandpass_filter.py"),
		Dir: dir, Segment: 4 * time.Second, Sample: 250 * time.Millisecond, Metrics: 250 * time.Millisecond, Progress: progressLog{t},
	})
	if err != nil {
		t.Fatal(err)
	}
	var text bytes.Buffer
	r.Text(&text)
	t.Log(text.String())
	for _, g := range []string{"overruns", "gaps in the recorded", "source gaps", "recordings read by neo", "failed API requests", "the daemon records"} {
		if gl := goal(t, r, g); !gl.Met {
			t.Errorf("goal %q not met: %s", gl.Name, gl.Measured)
		}
	}
	if r.Interrupted || r.Overruns != 0 || r.SourceGaps != 0 || r.Samples < 12*30000 || r.Blocks < 12*1000 {
		t.Errorf("pipeline: %d blocks, %d samples, %d overruns, %d gaps", r.Blocks, r.Samples, r.Overruns, r.SourceGaps)
	}
	// Cut at 4 s and 8 s (not at 12 s: too little would be left): three
	// recordings, each checked, whole, and following the one before it.
	if len(r.Segments) != 3 || r.ModeChanges != 4 {
		t.Fatalf("%d recordings, %d mode changes; want 3, 4", len(r.Segments), r.ModeChanges)
	}
	var total uint64
	for i, s := range r.Segments {
		if !s.Checked || !s.consistent(16) || s.Gaps != 0 || s.Backwards != 0 || s.Last-s.First+1 != int64(s.Samples) {
			t.Errorf("recording %d: %+v", i+1, s)
		}
		if i > 0 && s.First <= r.Segments[i-1].Last {
			t.Errorf("recording %d starts at sample %d, before the end of the previous one (%d)", i+1, s.First, r.Segments[i-1].Last)
		}
		if !strings.HasSuffix(s.Path, filepath.Join("experiment1", "recording"+string(rune('1'+i)))) {
			t.Errorf("recording %d at %s", i+1, s.Path)
		}
		if _, err := os.Stat(s.Path); (err == nil) == s.Removed {
			t.Errorf("recording %d: removed=%v but stat says %v", i+1, s.Removed, err)
		}
		total += s.Samples
	}
	if total > r.Samples || total < r.Samples/2 {
		t.Errorf("recorded %d samples of %d", total, r.Samples)
	}
	if r.Requests < 30 || r.Failures != 0 || r.P50 <= 0 || r.P99 < r.P50 || r.MaxLatency < r.P99 {
		t.Errorf("API: %d requests, %d failures, p50 %s p99 %s max %s", r.Requests, r.Failures, r.P50, r.P99, r.MaxLatency)
	}
	if !r.RSS.Measured() || r.RSS.Start < 10e6 || float64(r.PeakRSS) < r.RSS.End || !r.Threads.Measured() || r.Threads.Start < 2 ||
		!r.FDs.Measured() || r.FDs.Start < 3 || !r.Goroutines.Measured() || r.Goroutines.Start < 5 {
		t.Errorf("process figures: RSS %+v peak %d, threads %+v, fds %+v, goroutines %+v", r.RSS, r.PeakRSS, r.Threads, r.FDs, r.Goroutines)
	}
	if !(r.CPUMean > 0) || r.CPUMax < r.CPUMean || r.LoadMax <= 0 || r.WarmUp <= 0 || r.Window <= 0 {
		t.Errorf("cpu %.1f / %.1f, load %.2f, warm-up %s, window %s", r.CPUMean, r.CPUMax, r.LoadMax, r.WarmUp, r.Window)
	}
	if r.LogErrors != 0 || r.python == "" {
		t.Errorf("daemon log: %d errors (%s), python %q", r.LogErrors, r.FirstLogError, r.python)
	}
	for _, want := range []string{"goals", "overruns: 0", "RSS drift after warm-up", "goroutines flat", "experiment1/recording3", "load average", "CPU since the row before"} {
		if !strings.Contains(text.String(), want) {
			t.Errorf("report lacks %q", want)
		}
	}
}

// TestSoakCatchesOverruns runs the soak over a module that stalls for
// 0.6 s once, with a 50 ms queue and no block timeout (with one, the queue
// before the stages holds the longest stall the watchdog allows): the
// daemon drops blocks, and the soak must report the overruns, find the same
// number of samples missing in the recorded sample numbers, and fail.
func TestSoakCatchesOverruns(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the daemon for 6 s")
	}
	bin := buildBinary(t)
	t.Parallel()
	dir := t.TempDir()
	mod := filepath.Join(dir, "stall.py")
	os.WriteFile(mod, []byte(`
import time
class PyProcessor:
    def __init__(self, processor, num_channels, sample_rate):
        self.n = 0
    def process(self, data):
        self.n += 1
        if self.n == 1500:
            time.sleep(0.6)
`), 0o644)
	r, err := RunSoak(context.Background(), SoakOptions{
		Exe: bin, Duration: 6 * time.Second, Channels: 8, Module: mod, Dir: dir, QueueMS: 50,
		ExtraTOML: "[python]\nblock_timeout_ms = 0\n",
		Sample:    250 * time.Millisecond, Progress: progressLog{t},
	})
	if err != nil {
		t.Fatal(err)
	}
	var text bytes.Buffer
	r.Text(&text)
	t.Log(text.String())
	if r.Overruns == 0 || r.OverrunSamples == 0 {
		t.Fatalf("no overruns reported")
	}
	if len(r.Segments) != 1 {
		t.Fatalf("%d recordings, want 1", len(r.Segments))
	}
	s := r.Segments[0]
	if !s.Checked || s.Gaps == 0 || s.Missing != r.OverrunSamples || s.Removed {
		t.Errorf("recording: %+v; the daemon dropped %d samples", s, r.OverrunSamples)
	}
	if goal(t, r, "overruns").Met || goal(t, r, "gaps in the recorded").Met || !r.Failed() {
		t.Errorf("goals: %+v", r.Goals())
	}
	if !goal(t, r, "the daemon records").Met || !goal(t, r, "failed API requests").Met || !goal(t, r, "recordings read by neo").Met {
		t.Errorf("an overrun is not a crash: %+v", r.Goals())
	}
	if r.LogWarnings == 0 {
		t.Error("the daemon logged no warning about the overruns")
	}
	if !strings.Contains(text.String(), "NOT met") {
		t.Error("report does not say NOT met")
	}
}
