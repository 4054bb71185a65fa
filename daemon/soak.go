package daemon

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

const soakUsage = `Usage: ephysd soak [flags]

Runs the real daemon (ephysd run, a child process) for --duration on the
simulated headstage (--channels × --rate, paced to the wall clock) through
--module, recording, while it polls the daemon's HTTP API every 100 ms
(/api/status, /api/ephysd/status and the other Open Ephys endpoints; /metrics
every 5 s) and samples its /proc figures every second. At the end (or on
Ctrl-C) it stops the daemon cleanly, checks every recording with neo and
numpy, prints the report and exits 1 if a goal was missed:

  overruns 0; gaps in the recorded sample numbers 0; source gaps and device
  disconnects 0; recorded samples ≈ wall-clock time × rate; 0 failed API
  requests; RSS drift ≤ 1 % after warm-up; goroutines, threads and open
  files flat; the daemon stops cleanly.

Warm-up: the first 10 % of the run, at least min(60 s, a quarter of it),
and until the daemon's first Go garbage collection, up to half the run
(until then the Go heap grows towards the collector's goal by design; a
collection comes every 2 minutes at the latest). Drift and flatness compare the median of the first
window after warm-up with the median of the last window (60 s, or a third of
what is left after warm-up in a shorter run).

A recording longer than --segment is cut: the soak switches the daemon to
ACQUIRE and back to RECORD (recording2, 3, …), checks the finished recording
and deletes it unless --keep (384 ch × 30 kHz write 85 GB an hour).

Flags:
`

// Goals of the soak that are not plain zeros.
const (
	soakRSSDriftGoal = 1.0 // % after warm-up
	// The flat series may end this much above where they started: a
	// keep-alive connection of a client, or an OS thread the Go runtime made
	// for a blocking system call (it keeps those), is not a leak; a leak over
	// a soak is hundreds.
	soakGoroutineSlack = 3
	soakThreadSlack    = 3
	soakFDSlack        = 2
)

// soakCheckScript checks one recording folder (…/recordingN): neo reads it,
// and the sample numbers of its continuous stream are read in chunks (a
// 10-minute segment of 384 channels has 18 million) for gaps. It prints one
// JSON object.
const soakCheckScript = `
import glob, json, os, sys
import numpy as np
from neo.rawio.openephysbinaryrawio import OpenEphysBinaryRawIO

rec = sys.argv[1]
out = {}
r = OpenEphysBinaryRawIO(dirname=rec)
r.parse_header()
out["neo_streams"] = int(r.signal_streams_count())
out["neo_segments"] = int(r.segment_count(0))
n = int(r.get_signal_size(0, 0, 0))
out["neo_samples"] = n
out["channels"] = int(r.signal_channels_count(0))
files = sorted(glob.glob(os.path.join(rec, "continuous", "*", "sample_numbers.npy")))
if len(files) != 1:
    raise SystemExit("%d continuous streams under %s, want 1" % (len(files), rec))
stream = os.path.dirname(files[0])
sn = np.load(files[0], mmap_mode="r")
out["sample_numbers"] = int(sn.shape[0])
out["timestamps"] = int(np.load(os.path.join(stream, "timestamps.npy"), mmap_mode="r").shape[0])
out["dat_bytes"] = os.path.getsize(os.path.join(stream, "continuous.dat"))
gaps = missing = backwards = 0
prev = None
step = 1 << 22
for i in range(0, sn.shape[0], step):
    c = np.asarray(sn[i:i + step], dtype=np.int64)
    if prev is not None:
        c = np.concatenate(([prev], c))
    d = np.diff(c)
    gaps += int(np.count_nonzero(d > 1))
    missing += int((d[d > 1] - 1).sum())
    backwards += int(np.count_nonzero(d < 1))
    prev = int(c[-1])
out["gaps"], out["missing"], out["backwards"] = gaps, missing, backwards
out["first"] = int(sn[0]) if sn.shape[0] else -1
out["last"] = int(sn[-1]) if sn.shape[0] else -1
k = min(n, 3000)
out["tail_std"] = float(r.get_analogsignal_chunk(0, 0, n - k, n, 0, None).std()) if k else 0.0
print(json.dumps(out))
`

// SoakOptions configure RunSoak. Zero values take the defaults noted.
type SoakOptions struct {
	Exe       string        // the ephysd binary to run as the daemon (required)
	Duration  time.Duration // from the first block through the pipeline (required)
	Channels  int           // default 384
	Rate      int           // Hz, default 30000
	Module    string        // the Python stage's module (required)
	Dir       string        // working folder: configuration, daemon log, recordings (required, must exist)
	Segment   time.Duration // recording length before the next recording starts; 0: one recording
	QueueMS   float64       // [pipeline] queue_ms of the daemon; 0: its default
	ExtraTOML string        // appended to the daemon's configuration: tables the soak does not write ([python], …)
	Realtime  bool          // SCHED_FIFO 50 and locked memory in the daemon
	Keep      bool          // keep the recordings once checked
	Poll      time.Duration // API poll interval, default 100 ms
	Sample    time.Duration // /proc sample interval, default 1 s
	Metrics   time.Duration // /metrics scrape interval, default 5 s (shorter in short runs)
	Python    string        // the interpreter with neo for the checks, default /usr/bin/python3
	Progress  io.Writer     // a progress line now and then; nil: none
}

// SoakSegment is one recording of the soak and what its check found.
type SoakSegment struct {
	Path   string        // the recordingN folder
	Start  time.Duration // since the daemon was ready
	Wall   time.Duration // how long it recorded, by the wall clock
	Expect uint64        // samples the wall clock predicts

	Checked     bool    // the check ran and answered
	Samples     uint64  // entries of sample_numbers.npy
	NeoSamples  uint64  // neo's signal size
	DatSamples  uint64  // continuous.dat bytes / (2 × channels)
	Timestamps  uint64  // entries of timestamps.npy
	Channels    int     // neo's channel count
	First, Last int64   // first and last sample number
	Gaps        uint64  // jumps in the sample numbers
	Missing     uint64  // samples missing in those jumps
	Backwards   uint64  // sample numbers not above the one before
	TailStd     float64 // standard deviation of the last 3000 samples (0: flat, as if zero-filled)
	Err         string  // why the check failed
	Removed     bool    // deleted once checked
}

// consistent reports whether neo, the sample numbers, the time stamps and
// continuous.dat agree on the sample count and the channel count is right.
func (s *SoakSegment) consistent(channels int) bool {
	return s.Checked && s.Err == "" && s.Channels == channels && s.NeoSamples == s.Samples &&
		s.DatSamples == s.Samples && s.Timestamps == s.Samples && s.Samples > 0 && s.TailStd > 0
}

// coversWall reports whether the recording spans the time it was recording
// for: its samples and the ones missing in gaps (counted apart) against the
// wall clock.
func (s *SoakSegment) coversWall(rate int) bool {
	return countClose(s.Samples+s.Missing, s.Expect, rate)
}

// countClose reports whether a recorded sample count matches the one the
// wall clock predicts: within 1 %, or 1 s of samples for short recordings
// (the recording starts and stops at the block after the request).
func countClose(got, want uint64, rate int) bool {
	d := max(got, want) - min(got, want)
	return d <= max(want/100, uint64(rate))
}

// point is one value of a series sampled during the soak, at its time since
// the daemon was ready.
type point struct {
	At time.Duration
	V  float64
}

// soakWindows returns the warm-up and the length of the windows that drift
// and flatness compare, for a run of length run. Warm-up lasts 10 % of the
// run, at least min(60 s, run/4), and until the first Go garbage collection
// after the daemon was ready (gcAt, when there was one; < 0: none), but no
// longer than half the run: before that collection the Go heap only grows,
// by design, towards the collector's goal — the runtime forces a collection
// every 2 minutes at the latest. A window is 60 s, or a third of what is
// left after warm-up, so the two windows never overlap.
func soakWindows(run, gcAt time.Duration) (warmUp, window time.Duration) {
	warmUp = max(run/10, min(60*time.Second, run/4), min(gcAt, run/2))
	window = min(60*time.Second, (run-warmUp)/3)
	return warmUp, window
}

// firstIncrease is the time of the first point whose value exceeds the
// first point's (a counter's first step), or -1.
func firstIncrease(s []point) time.Duration {
	for _, p := range s {
		if p.V > s[0].V {
			return p.At
		}
	}
	return -1
}

// Steady is a series over the steady part of a run: its medians over the
// first window after warm-up and over the last window, and its largest
// value after warm-up.
type Steady struct {
	Start, End, Max float64
	NStart, NEnd    int // samples in each window
}

// steadyOf computes Steady for a series over a run of length run.
func steadyOf(s []point, warmUp, window, run time.Duration) Steady {
	var first, last []float64
	st := Steady{}
	for _, p := range s {
		if p.At < warmUp || p.At > run {
			continue
		}
		st.Max = max(st.Max, p.V)
		if p.At < warmUp+window {
			first = append(first, p.V)
		}
		if p.At >= run-window {
			last = append(last, p.V)
		}
	}
	st.Start, st.NStart = median(first), len(first)
	st.End, st.NEnd = median(last), len(last)
	return st
}

// Measured reports whether both windows hold enough samples for a median.
func (s Steady) Measured() bool { return s.NStart >= 3 && s.NEnd >= 3 && s.Start > 0 }

// DriftPct is the change from the first window to the last, in % of the
// first.
func (s Steady) DriftPct() float64 {
	if s.Start == 0 {
		return 0
	}
	return 100 * (s.End - s.Start) / s.Start
}

// Flat reports whether the series ended at most slack above where it
// started.
func (s Steady) Flat(slack float64) bool { return s.Measured() && s.End-s.Start <= slack }

// median is the median of v (0 for none).
func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// durQuantile is the q-quantile (nearest rank) of sorted durations.
func durQuantile(sorted []time.Duration, q float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	i := int(q*float64(len(sorted)) + 0.999999)
	return sorted[min(max(i-1, 0), len(sorted)-1)]
}

// cpuPercent is the CPU time of the process between samples in % of one
// core: the mean over the steady part, and the largest over one interval.
func cpuPercent(ticks []point, warmUp, run time.Duration) (mean, peak float64) {
	var first, prev *point
	var last point
	for i := range ticks {
		p := &ticks[i]
		if p.At < warmUp || p.At > run {
			continue
		}
		if first == nil {
			first = p
		}
		if prev != nil && p.At > prev.At {
			peak = max(peak, 100*(p.V-prev.V)/clockTicks/(p.At-prev.At).Seconds())
		}
		prev, last = p, *p
	}
	if first == nil || last.At <= first.At {
		return 0, peak
	}
	return 100 * (last.V - first.V) / clockTicks / (last.At - first.At).Seconds(), peak
}

// SoakReport is what a soak measured, and its verdict.
type SoakReport struct {
	Channels, Rate int
	Module         string
	Duration       time.Duration // asked for
	Run            time.Duration // from ready to the stop
	Interrupted    bool
	Segment        time.Duration
	Realtime       bool
	Poll           time.Duration
	Sample         time.Duration
	WarmUp, Window time.Duration
	GCAt           time.Duration // the first Go garbage collection after ready; < 0: none
	GCs            int           // Go garbage collections during the run
	Started        time.Time
	Startup        time.Duration // from the daemon's start to its first block

	// Pipeline figures: the daemon's last word (its summary, or the last
	// status when it printed none).
	Blocks, Samples           uint64
	Overruns, OverrunSamples  uint64
	SourceGaps, GapSamples    uint64
	Disconnects               uint64
	LeftRecord                string // why the daemon left RECORD by itself, if it did
	Segments                  []*SoakSegment
	Requests, Failures        int
	LastFailure               string
	ModeChanges, ModeFailures int
	P50, P99, MaxLatency      time.Duration
	RSS, Goroutines, Threads  Steady
	GoHeap                    Steady // the Go heap's pages held from the OS (heap_sys − heap_released): how much of RSS is Go's
	FDs                       Steady
	PeakRSS                   uint64
	CPUMean, CPUMax           float64
	LoadMean, LoadMax         float64
	Cores                     int
	StopTook                  time.Duration
	ExitErr                   string // the daemon's exit status or early death; "" when it stopped cleanly
	LogWarnings, LogErrors    int
	FirstLogError             string
	Dir                       string // the working folder (kept when something failed)
	Log                       string // the daemon's log file
	timeline                  []soakMoment
	machine                   machineInfo
	python, numpy, pythonExe  string
}

// soakGoal is one goal and how the run did.
type soakGoal struct {
	Name, Measured string
	Met            bool
}

// recorded sums the recordings' checks: samples, expected samples, gaps,
// samples missing, recordings checked and recordings found wrong.
func (r *SoakReport) recorded() (samples, expect, gaps, missing uint64, checked, bad int) {
	for _, s := range r.Segments {
		expect += s.Expect
		if !s.Checked {
			continue
		}
		checked++
		samples += s.Samples
		gaps += s.Gaps
		missing += s.Missing
		if !s.consistent(r.Channels) || s.Backwards > 0 || !s.coversWall(r.Rate) {
			bad++
		}
	}
	return
}

// Goals lists every goal with the measured figure and whether it was met.
func (r *SoakReport) Goals() []soakGoal {
	var g []soakGoal
	add := func(name, measured string, met bool) { g = append(g, soakGoal{name, measured, met}) }
	add("overruns: 0", fmt.Sprintf("%d blocks (%d samples)", r.Overruns, r.OverrunSamples), r.Overruns == 0)
	samples, expect, gaps, missing, checked, bad := r.recorded()
	add("gaps in the recorded sample numbers: 0", fmt.Sprintf("%d (%d samples missing) in %d recordings", gaps, missing, checked),
		gaps == 0 && checked == len(r.Segments) && checked > 0)
	add("source gaps and device disconnects: 0", fmt.Sprintf("%d gaps (%d samples), %d disconnects", r.SourceGaps, r.GapSamples, r.Disconnects),
		r.SourceGaps == 0 && r.Disconnects == 0)
	add("recordings read by neo, consistent, samples ≈ wall-clock time × rate (±1 %)",
		fmt.Sprintf("%d samples, expected ≈ %d; %d of %d recordings off", samples, expect, bad+len(r.Segments)-checked, len(r.Segments)),
		checked == len(r.Segments) && checked > 0 && bad == 0)
	add("failed API requests: 0", fmt.Sprintf("%d of %d (+ %d of %d mode changes)", r.Failures, r.Requests, r.ModeFailures, r.ModeChanges),
		r.Failures == 0 && r.ModeFailures == 0 && r.Requests > 0)
	add(fmt.Sprintf("RSS drift after warm-up ≤ %g %%", soakRSSDriftGoal), r.rssFigure(), r.RSS.Measured() && r.RSS.DriftPct() <= soakRSSDriftGoal)
	flat := func(name string, s Steady, slack float64) {
		add(fmt.Sprintf("%s flat (end ≤ start + %g)", name, slack), steadyCounts(s), s.Flat(slack))
	}
	flat("goroutines", r.Goroutines, soakGoroutineSlack)
	flat("threads", r.Threads, soakThreadSlack)
	flat("open files", r.FDs, soakFDSlack)
	stop := fmt.Sprintf("exit 0 after %s", r.StopTook.Round(time.Millisecond))
	if r.ExitErr != "" {
		stop = r.ExitErr
	}
	if r.LeftRecord != "" {
		stop += "; left RECORD by itself: " + r.LeftRecord
	}
	add("the daemon records throughout and stops cleanly", stop, r.ExitErr == "" && r.LeftRecord == "")
	return g
}

// Failed reports whether a goal was missed.
func (r *SoakReport) Failed() bool {
	for _, g := range r.Goals() {
		if !g.Met {
			return true
		}
	}
	return false
}

// rssFigure is the RSS drift for the goals table.
func (r *SoakReport) rssFigure() string {
	if !r.RSS.Measured() {
		return fmt.Sprintf("not measured: %d and %d samples in the windows (the run is too short)", r.RSS.NStart, r.RSS.NEnd)
	}
	return fmt.Sprintf("%+.2f %% (%s → %s)", r.RSS.DriftPct(), fmtMB(r.RSS.Start), fmtMB(r.RSS.End))
}

// steadyCounts shows a count series as "start → end (max m)".
func steadyCounts(s Steady) string {
	if !s.Measured() {
		return "not measured"
	}
	return fmt.Sprintf("%g → %g (max %g)", s.Start, s.End, s.Max)
}

// fmtMB shows bytes in MB (10⁶).
func fmtMB(b float64) string { return fmt.Sprintf("%.1f MB", b/1e6) }

// figures is the report's table of figures.
func (r *SoakReport) figures() benchTable {
	t := benchTable{Header: []string{"figure", "value"}}
	how := "one recording"
	if r.Segment > 0 && r.Segment < r.Duration {
		how = fmt.Sprintf("a new recording every %s", r.Segment)
	}
	if r.Realtime {
		how += ", SCHED_FIFO 50, memory locked"
	} else {
		how += ", realtime scheduling off"
	}
	ran := r.Run.Round(100 * time.Millisecond).String()
	if r.Interrupted {
		ran += fmt.Sprintf(" (interrupted; %s asked)", r.Duration)
	}
	t.add("run", fmt.Sprintf("%s of %d ch × %d Hz simulated, %s, recording (%s); daemon ready in %s",
		ran, r.Channels, r.Rate, filepath.Base(r.Module), how, r.Startup.Round(10*time.Millisecond)))
	t.add("pipeline", fmt.Sprintf("%d blocks, %d samples; %d overruns (%d samples); %d source gaps; %d device disconnects",
		r.Blocks, r.Samples, r.Overruns, r.OverrunSamples, r.SourceGaps, r.Disconnects))
	samples, expect, gaps, missing, checked, _ := r.recorded()
	t.add("recordings", fmt.Sprintf("%d (%d checked with neo): %d samples, expected ≈ %d from their wall-clock time; %d gaps (%d samples missing)",
		len(r.Segments), checked, samples, expect, gaps, missing))
	t.add("API", fmt.Sprintf("%d requests every %s, %d failed; latency p50 %s, p99 %s, max %s; %d mode changes (%d failed)",
		r.Requests, r.Poll, r.Failures, fmtDur(r.P50), fmtDur(r.P99), fmtDur(r.MaxLatency), r.ModeChanges, r.ModeFailures))
	if r.LastFailure != "" {
		t.add("last API failure", r.LastFailure)
	}
	gc := "no Go garbage collection during the run"
	if r.GCAt >= 0 {
		gc = fmt.Sprintf("first Go garbage collection at %s, %d during the run", roundDur(r.GCAt), r.GCs)
	}
	t.add("warm-up, windows", fmt.Sprintf("%s (%s); medians over windows of %s; /proc every %s", roundDur(r.WarmUp), gc, roundDur(r.Window), r.Sample))
	t.add("RSS", fmt.Sprintf("%s at warm-up end, %s at the end: drift %+.2f %%; peak (VmHWM) %s; of which the Go heap holds %s → %s",
		fmtMB(r.RSS.Start), fmtMB(r.RSS.End), r.RSS.DriftPct(), fmtMB(float64(r.PeakRSS)), fmtMB(r.GoHeap.Start), fmtMB(r.GoHeap.End)))
	t.add("goroutines / threads / open files", fmt.Sprintf("%s / %s / %s (start → end)", steadyCounts(r.Goroutines), steadyCounts(r.Threads), steadyCounts(r.FDs)))
	t.add("CPU", fmt.Sprintf("%.1f %% of one core mean, %.1f %% max (over %s)", r.CPUMean, r.CPUMax, r.Sample))
	t.add("load average (1 min)", fmt.Sprintf("mean %.2f, max %.2f on %d cores (everything on the machine, the daemon included)", r.LoadMean, r.LoadMax, r.Cores))
	logs := fmt.Sprintf("%d warnings, %d errors", r.LogWarnings, r.LogErrors)
	if r.FirstLogError != "" {
		logs += "; first: " + r.FirstLogError
	}
	t.add("daemon log", logs)
	stop := fmt.Sprintf("exit 0, %s after SIGTERM", r.StopTook.Round(time.Millisecond))
	if r.ExitErr != "" {
		stop = r.ExitErr
	}
	t.add("stop", stop)
	return t
}

// goalsTable is the goals with their verdicts.
func (r *SoakReport) goalsTable() benchTable {
	t := benchTable{Header: []string{"goal", "measured", "verdict"}}
	for _, g := range r.Goals() {
		t.add(g.Name, g.Measured, met(g.Met))
	}
	return t
}

// soakMoment is the state of the daemon at one point of the run.
type soakMoment struct {
	At           time.Duration
	RSS          uint64
	Threads, FDs int
	Goroutines   float64 // the last scrape before At (0: none yet)
	CPU          float64 // % of one core since the moment before
	Load         float64
	Overruns     float64 // so far
}

// soakTimeline picks n moments spread over the run: the last /proc sample
// at or before each, the CPU between them.
func soakTimeline(procs []soakProcSample, goroutines, overruns []point, run time.Duration, n int) []soakMoment {
	at := func(s []point, t time.Duration) float64 {
		v := 0.0
		for _, p := range s {
			if p.At > t {
				break
			}
			v = p.V
		}
		return v
	}
	var out []soakMoment
	var prev *soakProcSample
	for k := 1; k <= n; k++ {
		t := run * time.Duration(k) / time.Duration(n)
		var cur *soakProcSample
		for i := range procs {
			if procs[i].At > t {
				break
			}
			cur = &procs[i]
		}
		if cur == nil || (prev != nil && cur.At == prev.At) {
			continue
		}
		m := soakMoment{At: t, RSS: cur.RSS, Threads: cur.Threads, FDs: cur.FDs, Load: cur.Load,
			Goroutines: at(goroutines, t), Overruns: at(overruns, t)}
		if prev != nil {
			m.CPU = 100 * float64(cur.Ticks-prev.Ticks) / clockTicks / (cur.At - prev.At).Seconds()
		}
		out = append(out, m)
		prev = cur
	}
	return out
}

// timelineTable is the run's moments, one a row.
func (r *SoakReport) timelineTable() benchTable {
	t := benchTable{Header: []string{"time", "RSS", "goroutines", "threads", "open files", "CPU since the row before", "load (1 min)", "overruns so far"}}
	for i, m := range r.timeline {
		cpu := "—"
		if i > 0 {
			cpu = fmt.Sprintf("%.1f %%", m.CPU)
		}
		t.add(roundDur(m.At).String(), fmtMB(float64(m.RSS)), fmt.Sprintf("%g", m.Goroutines), strconv.Itoa(m.Threads), strconv.Itoa(m.FDs),
			cpu, fmt.Sprintf("%.2f", m.Load), fmt.Sprintf("%g", m.Overruns))
	}
	return t
}

// segmentsTable is the recordings and their checks.
func (r *SoakReport) segmentsTable() benchTable {
	t := benchTable{Header: []string{"recording", "wall clock", "samples", "expected", "gaps", "check"}}
	for _, s := range r.Segments {
		check := "ok"
		switch {
		case !s.Checked:
			check = "not checked: " + s.Err
		case s.Err != "":
			check = "FAILED: " + s.Err
		case !s.consistent(r.Channels):
			check = fmt.Sprintf("INCONSISTENT: neo %d, sample numbers %d, timestamps %d, continuous.dat %d samples; %d channels; tail std %.3g",
				s.NeoSamples, s.Samples, s.Timestamps, s.DatSamples, s.Channels, s.TailStd)
		case s.Backwards > 0:
			check = fmt.Sprintf("FAILED: %d sample numbers go backwards", s.Backwards)
		case !s.coversWall(r.Rate):
			check = "FAILED: sample count off the wall clock"
		case s.Gaps > 0:
			check = "FAILED: gaps in the sample numbers"
		}
		if s.Removed {
			check += " (deleted)"
		} else if s.Checked {
			check += " (kept)"
		}
		t.add(soakSegmentName(s.Path), s.Wall.Round(time.Millisecond).String(), strconv.FormatUint(s.Samples, 10),
			strconv.FormatUint(s.Expect, 10), fmt.Sprintf("%d (%d samples)", s.Gaps, s.Missing), check)
	}
	return t
}

// soakSegmentName is "experimentE/recordingN" of a recording folder.
func soakSegmentName(p string) string {
	return filepath.Base(filepath.Dir(p)) + "/" + filepath.Base(p)
}

// Text prints the report.
func (r *SoakReport) Text(w io.Writer) {
	fmt.Fprintf(w, "\nephysd soak — %s\n", r.machine.oneLine())
	r.figures().text(w)
	fmt.Fprintln(w)
	r.timelineTable().text(w)
	fmt.Fprintln(w)
	r.segmentsTable().text(w)
	fmt.Fprintln(w, "\ngoals")
	r.goalsTable().text(w)
	if r.Failed() {
		fmt.Fprintf(w, "\nsoak: goals NOT met; the daemon's log and any failed recording are in %s\n", r.Dir)
	} else {
		fmt.Fprintln(w, "\nsoak: every goal met")
	}
}

// roundDur rounds a duration for the report: to seconds from 10 s up.
func roundDur(d time.Duration) time.Duration {
	if d >= 10*time.Second {
		return d.Round(time.Second)
	}
	return d.Round(100 * time.Millisecond)
}

// metricValue finds an unlabelled sample in Prometheus text.
func metricValue(text []byte, name string) (float64, bool) {
	for _, l := range bytes.Split(text, []byte("\n")) {
		rest, ok := bytes.CutPrefix(l, []byte(name+" "))
		if !ok {
			continue
		}
		v, err := strconv.ParseFloat(string(bytes.TrimSpace(rest)), 64)
		return v, err == nil
	}
	return 0, false
}

// summaryFigures reads `ephysd run`'s summary (printSummary).
var (
	summaryBlocks   = regexp.MustCompile(`(?m)^blocks\s+(\d+) read`)
	summarySamples  = regexp.MustCompile(`(?m)^samples\s+(\d+) `)
	summaryOverruns = regexp.MustCompile(`(?m)^overruns\s+(\d+) blocks \((\d+) samples`)
	summaryGaps     = regexp.MustCompile(`(?m)^gaps\s+(\d+) in the source \((\d+) samples`)
	summaryDevice   = regexp.MustCompile(`(?m)^device\s+disconnected (\d+) times`)
)

// parseRunSummary fills the pipeline figures from the daemon's summary; it
// reports whether the summary was there.
func (r *SoakReport) parseRunSummary(out []byte) bool {
	num := func(re *regexp.Regexp, i int) (uint64, bool) {
		m := re.FindSubmatch(out)
		if m == nil {
			return 0, false
		}
		v, err := strconv.ParseUint(string(m[i]), 10, 64)
		return v, err == nil
	}
	ov, ok := num(summaryOverruns, 1)
	if !ok {
		return false
	}
	r.Overruns = ov
	r.OverrunSamples, _ = num(summaryOverruns, 2)
	r.Blocks, _ = num(summaryBlocks, 1)
	r.Samples, _ = num(summarySamples, 1)
	r.SourceGaps, _ = num(summaryGaps, 1) // absent: 0
	r.GapSamples, _ = num(summaryGaps, 2)
	r.Disconnects, _ = num(summaryDevice, 1)
	return true
}

// soakAPI is the soak's client of the daemon's HTTP API: every request is
// timed, and a failure (transport error, status other than 200, an answer
// that is not the JSON expected) is counted with what went wrong.
type soakAPI struct {
	base   string
	client *http.Client

	mu          sync.Mutex
	lat         []time.Duration
	requests    int
	failures    int
	lastFailure string
}

// do sends one request and decodes its answer into into (a *[]byte takes
// it as it is); count adds it to the figures.
func (a *soakAPI) do(method, path, body string, into any, count bool) error {
	req, err := http.NewRequest(method, a.base+path, strings.NewReader(body))
	if err != nil {
		return err
	}
	t0 := time.Now()
	resp, err := a.client.Do(req)
	var data []byte
	if err == nil {
		data, err = io.ReadAll(resp.Body)
		resp.Body.Close()
		if err == nil && resp.StatusCode != http.StatusOK {
			err = fmt.Errorf("HTTP %d: %s", resp.StatusCode, strings.TrimSpace(string(data)))
		}
	}
	took := time.Since(t0)
	if err == nil && into != nil {
		if b, ok := into.(*[]byte); ok {
			*b = data
		} else if e := json.Unmarshal(data, into); e != nil {
			err = fmt.Errorf("answer is not the JSON expected: %v", e)
		}
	}
	if err != nil {
		err = fmt.Errorf("%s %s: %w", method, path, err)
	}
	if count {
		a.mu.Lock()
		a.requests++
		a.lat = append(a.lat, took)
		if err != nil {
			a.failures++
			a.lastFailure = fmt.Sprintf("%s (at %s)", err, time.Now().Format("15:04:05"))
		}
		a.mu.Unlock()
	}
	return err
}

// status is GET /api/ephysd/status.
func (a *soakAPI) status() (*ControlStatus, error) {
	var st ControlStatus
	if err := a.do("GET", "/api/ephysd/status", "", &st, true); err != nil {
		return nil, err
	}
	return &st, nil
}

// soakProcSample is one /proc sample of the daemon.
type soakProcSample struct {
	At       time.Duration
	RSS, HWM uint64
	Threads  int
	FDs      int
	Ticks    uint64
	Load     float64
}

// procStatus is VmRSS, VmHWM (bytes) and Threads of /proc/<pid>/status.
func procStatus(pid int) (rss, hwm uint64, threads int, ok bool) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, 0, 0, false
	}
	found := 0
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 2 {
			continue
		}
		v, err := strconv.ParseUint(f[1], 10, 64)
		if err != nil {
			continue
		}
		switch f[0] {
		case "VmRSS:":
			rss, found = v*1024, found+1
		case "VmHWM:":
			hwm, found = v*1024, found+1
		case "Threads:":
			threads, found = int(v), found+1
		}
	}
	return rss, hwm, threads, found == 3
}

// procFDs counts the open file descriptors of a process.
func procFDs(pid int) (int, bool) {
	e, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	return len(e), err == nil
}

// soakLoad is the 1-minute load average.
func soakLoad() float64 {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return 0
	}
	var l float64
	fmt.Sscan(string(b), &l)
	return l
}

// freePort returns a TCP port on loopback that nothing listens on now.
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// soakBytesPerSecond is what a recording of the soak writes per second:
// int16 samples, and an int64 sample number and a float64 time stamp per
// sample frame.
func soakBytesPerSecond(channels, rate int) float64 { return float64(rate) * float64(2*channels+16) }

// freeBytes is the space available to this user on dir's file system.
func freeBytes(dir string) (uint64, error) {
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err != nil {
		return 0, err
	}
	return st.Bavail * uint64(st.Bsize), nil
}

// defaults fills in the zero options and checks the others.
func (o *SoakOptions) defaults() error {
	if o.Channels == 0 {
		o.Channels = 384
	}
	if o.Rate == 0 {
		o.Rate = 30000
	}
	if o.Poll <= 0 {
		o.Poll = 100 * time.Millisecond
	}
	if o.Sample <= 0 {
		o.Sample = time.Second
	}
	if o.Metrics <= 0 {
		// At least 6 scrapes in a window, as often as every 5 s.
		_, w := soakWindows(o.Duration, -1)
		o.Metrics = max(min(5*time.Second, w/6), 500*time.Millisecond)
	}
	if o.Python == "" {
		o.Python = systemPythonPath
	}
	switch {
	case o.Exe == "":
		return errors.New("soak: no ephysd binary to run")
	case o.Duration <= 0:
		return usageError{errors.New("soak: --duration must be > 0")}
	case o.Channels < 1 || o.Channels > 4096:
		return usageError{fmt.Errorf("soak: --channels %d: the simulator takes 1–4096", o.Channels)}
	case o.Rate < 1:
		return usageError{fmt.Errorf("soak: --rate %d: give a sample rate in Hz", o.Rate)}
	case o.Dir == "":
		return errors.New("soak: no working folder")
	case o.Segment < 0:
		return usageError{errors.New("soak: --segment must be ≥ 0")}
	}
	if _, err := os.Stat(o.Module); err != nil {
		return fmt.Errorf("soak: module %s: %w (run from the repository root or pass --module)", o.Module, err)
	}
	return nil
}

// systemPythonPath is Debian's interpreter, which has numpy and neo (a pyenv
// python3 first on PATH has neither).
const systemPythonPath = "/usr/bin/python3"

// RunSoak runs the soak described by o and returns its report. The error is
// for a soak that could not run (a missing binary, no disk space, a daemon
// that never became ready); goals missed are in the report (Failed).
func RunSoak(ctx context.Context, o SoakOptions) (*SoakReport, error) {
	if err := o.defaults(); err != nil {
		return nil, err
	}
	r := &SoakReport{Channels: o.Channels, Rate: o.Rate, Module: o.Module, Duration: o.Duration, Segment: o.Segment, Realtime: o.Realtime,
		Poll: o.Poll, Sample: o.Sample, Cores: runtime.NumCPU(), Started: time.Now(), Dir: o.Dir}
	recDir := filepath.Join(o.Dir, "recordings")
	if err := os.MkdirAll(recDir, 0o755); err != nil {
		return nil, fmt.Errorf("soak: %w", err)
	}
	// The recording of a segment and the previous one (until it is checked)
	// must fit, with 1 GB to spare for everyone else.
	seg := o.Segment
	if seg == 0 || seg > o.Duration {
		seg = o.Duration
	}
	need := uint64(2*soakBytesPerSecond(o.Channels, o.Rate)*seg.Seconds()) + 1<<30
	if o.Segment == 0 || o.Segment >= o.Duration {
		need = uint64(soakBytesPerSecond(o.Channels, o.Rate)*seg.Seconds()) + 1<<30
	}
	if free, err := freeBytes(recDir); err == nil && free < need {
		return nil, fmt.Errorf("soak: %s has %.1f GB free, the recordings need %.1f GB (%.0f MB/s): pass --segment (shorter recordings, each deleted once checked) or --out on a larger disk",
			recDir, float64(free)/1e9, float64(need)/1e9, soakBytesPerSecond(o.Channels, o.Rate)/1e6)
	}
	port, err := freePort()
	if err != nil {
		return nil, fmt.Errorf("soak: no free TCP port on loopback: %w", err)
	}
	cfgPath := filepath.Join(o.Dir, "ephysd.toml")
	if err := os.WriteFile(cfgPath, []byte(soakConfig(o, recDir, port)), 0o644); err != nil {
		return nil, fmt.Errorf("soak: %w", err)
	}
	r.Log = filepath.Join(o.Dir, "ephysd.log")
	logFile, err := os.Create(r.Log)
	if err != nil {
		return nil, fmt.Errorf("soak: %w", err)
	}
	defer logFile.Close()

	cmd := exec.Command(o.Exe, "run", "--config", cfgPath)
	var stdout bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, logFile
	cmd.Env = soakEnv()
	// A soak killed hard takes its daemon along (a stray 384-channel
	// recording would fill the disk); in a process group of its own, the
	// daemon does not get the terminal's Ctrl-C: the soak stops it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM, Setpgid: true}
	t0 := time.Now()
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("soak: starting %s: %w", o.Exe, err)
	}
	pid := cmd.Process.Pid
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()

	api := &soakAPI{base: fmt.Sprintf("http://127.0.0.1:%d", port), client: &http.Client{
		Timeout:   10 * time.Second,
		Transport: &http.Transport{MaxIdleConnsPerHost: 2, DisableCompression: true},
	}}
	progress := func(format string, args ...any) {
		if o.Progress != nil {
			fmt.Fprintf(o.Progress, "soak: "+format+"\n", args...)
		}
	}

	// Ready: the daemon answers and a block went through the pipeline.
	first, err := soakWaitReady(ctx, api, exited, 90*time.Second)
	if err != nil {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(stopTimeout):
			cmd.Process.Kill()
		}
		return nil, fmt.Errorf("soak: the daemon did not become ready: %w\n%s", err, tailFile(r.Log, 20))
	}
	ready := time.Now()
	r.Startup = ready.Sub(t0)
	progress("daemon %d ready in %s (http %s, log %s); running for %s", pid, r.Startup.Round(10*time.Millisecond), api.base, r.Log, o.Duration)

	// The first recording started when the daemon entered RECORD.
	cur := &SoakSegment{Path: first.Recording.Path, Start: -time.Duration(first.Recording.Seconds * float64(time.Second))}
	segStartWall := ready.Add(cur.Start)

	checker := newSoakChecker(o, progress)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var procMu sync.Mutex
	var procs []soakProcSample
	wg.Add(1)
	go func() { // /proc sampler
		defer wg.Done()
		t := time.NewTicker(o.Sample)
		defer t.Stop()
		for {
			s := soakProcSample{At: time.Since(ready), Load: soakLoad()}
			var ok1, ok2, ok3 bool
			s.RSS, s.HWM, s.Threads, ok1 = procStatus(pid)
			s.FDs, ok2 = procFDs(pid)
			s.Ticks, ok3 = procTicks(pid)
			if ok1 && ok2 && ok3 {
				procMu.Lock()
				procs = append(procs, s)
				procMu.Unlock()
			}
			select {
			case <-stop:
				return
			case <-t.C:
			}
		}
	}()

	// The API poller runs on this goroutine, and so do the recording
	// cuts: they are requests like the others.
	var goroutines, gcs, goHeap, overruns []point
	scrape := func() {
		var text []byte
		if api.do("GET", "/metrics", "", &text, true) != nil {
			return
		}
		at := time.Since(ready)
		if v, ok := metricValue(text, "go_goroutines"); ok {
			goroutines = append(goroutines, point{at, v})
		}
		if v, ok := metricValue(text, "go_gc_duration_seconds_count"); ok {
			gcs = append(gcs, point{at, v})
		}
		sys, ok1 := metricValue(text, "go_memstats_heap_sys_bytes")
		released, ok2 := metricValue(text, "go_memstats_heap_released_bytes")
		if ok1 && ok2 {
			goHeap = append(goHeap, point{at, sys - released})
		}
	}
	var last *ControlStatus = first
	endpoints := []string{"/api/recording", "/api/processors", "/api/cpu", "/api/latency"}
	poll := time.NewTicker(o.Poll)
	defer poll.Stop()
	report := time.NewTicker(max(o.Duration/20, 10*time.Second))
	defer report.Stop()
	deadline := time.NewTimer(o.Duration)
	defer deadline.Stop()
	var lastScrape time.Time
	var exitErr error
	daemonGone := false
	tick := 0
loop:
	for {
		select {
		case <-ctx.Done():
			r.Interrupted = true
			break loop
		case <-deadline.C:
			break loop
		case exitErr = <-exited:
			daemonGone = true
			r.ExitErr = fmt.Sprintf("the daemon exited by itself after %s: %v", time.Since(ready).Round(time.Second), exitErr)
			break loop
		case <-report.C:
			procMu.Lock()
			var p soakProcSample
			if len(procs) > 0 {
				p = procs[len(procs)-1]
			}
			procMu.Unlock()
			api.mu.Lock()
			req, fail := api.requests, api.failures
			api.mu.Unlock()
			var ov uint64
			if last != nil && last.Pipeline != nil {
				ov = last.Pipeline.Overruns
			}
			progress("%s/%s  RSS %s  threads %d  fds %d  overruns %d  API %d requests (%d failed)  load %.2f",
				time.Since(ready).Round(time.Second), o.Duration, fmtMB(float64(p.RSS)), p.Threads, p.FDs, ov, req, fail, p.Load)
		case <-poll.C:
			tick++
			var mode struct {
				Mode string `json:"mode"`
			}
			// Cuts run on this goroutine too: a poll never sees their
			// ACQUIRE, so any mode but RECORD means the recording stopped
			// by itself (a full disk, the source ended).
			if err := api.do("GET", "/api/status", "", &mode, true); err == nil && mode.Mode != string(Record) && r.LeftRecord == "" {
				r.LeftRecord = fmt.Sprintf("%s at %s", mode.Mode, time.Since(ready).Round(time.Second))
			}
			if st, err := api.status(); err == nil {
				last = st
				if p := st.Pipeline; p != nil && (len(overruns) == 0 || overruns[len(overruns)-1].V != float64(p.Overruns)) {
					overruns = append(overruns, point{time.Since(ready), float64(p.Overruns)})
				}
				if st.Mode != Record && r.LeftRecord == "" {
					r.LeftRecord = fmt.Sprintf("%s at %s", st.Mode, time.Since(ready).Round(time.Second))
				}
				if st.Mode != Record && st.LastError != "" && !strings.Contains(r.LeftRecord, st.LastError) {
					r.LeftRecord += ": " + st.LastError
				}
			}
			var discard json.RawMessage
			api.do("GET", endpoints[tick%len(endpoints)], "", &discard, true)
			if time.Since(lastScrape) >= o.Metrics {
				lastScrape = time.Now()
				scrape()
			}
			left := o.Duration - time.Since(ready)
			if o.Segment > 0 && time.Since(segStartWall) >= o.Segment && left >= o.Segment/4 {
				next, err := soakCut(api, r, cur, segStartWall, ready, o.Rate)
				checker.add(cur)
				r.Segments = append(r.Segments, cur)
				if err != nil {
					progress("cutting the recording failed: %v", err)
					r.LeftRecord = "cutting the recording: " + err.Error()
					cur = &SoakSegment{} // none is running that the soak knows of
					break loop
				}
				cur, segStartWall = next, ready.Add(next.Start)
				progress("recording %s started", soakSegmentName(cur.Path))
			}
		}
	}
	r.Run = time.Since(ready)
	stopSent := time.Now()
	if !daemonGone {
		scrape() // a last look before the stop
		stopSent = time.Now()
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case exitErr = <-exited:
			r.StopTook = time.Since(stopSent)
			if exitErr != nil {
				r.ExitErr = fmt.Sprintf("exit after SIGTERM: %v", exitErr)
			}
		case <-time.After(stopTimeout + 40*time.Second):
			cmd.Process.Kill()
			<-exited
			r.ExitErr = fmt.Sprintf("did not stop within %s of SIGTERM: killed", stopTimeout+40*time.Second)
		}
	}
	close(stop)
	wg.Wait()
	cur.Wall = stopSent.Sub(segStartWall)
	cur.Expect = uint64(cur.Wall.Seconds() * float64(o.Rate))
	if cur.Path != "" {
		checker.add(cur)
		r.Segments = append(r.Segments, cur)
	}
	api.client.CloseIdleConnections()

	if !r.parseRunSummary(stdout.Bytes()) && last != nil && last.Pipeline != nil {
		p := last.Pipeline
		r.Blocks, r.Samples, r.Overruns, r.OverrunSamples, r.SourceGaps, r.GapSamples = p.Blocks, p.Samples, p.Overruns, p.OverrunSamples, p.Gaps, p.GapSamples
		if last.Source != nil && last.Source.Device != nil {
			r.Disconnects = last.Source.Device.Disconnects
		}
	}
	progress("stopped after %s; checking the recordings", r.Run.Round(time.Second))
	checker.finish()

	api.mu.Lock()
	r.Requests, r.Failures, r.LastFailure = api.requests, api.failures, api.lastFailure
	lat := slices.Clone(api.lat)
	api.mu.Unlock()
	slices.Sort(lat)
	r.P50, r.P99 = durQuantile(lat, 0.5), durQuantile(lat, 0.99)
	if len(lat) > 0 {
		r.MaxLatency = lat[len(lat)-1]
	}
	r.summarise(procs, goroutines, gcs, goHeap)
	r.timeline = soakTimeline(procs, goroutines, overruns, r.Run, 10)
	r.readLog()
	r.machine = describeMachine(nil, recDir)
	r.machine.Python, r.machine.Numpy, r.machine.Exe = r.python, r.numpy, r.pythonExe
	if r.pythonExe != "" {
		if out, err := exec.Command(r.pythonExe, "-I", "-c", "import scipy; print(scipy.__version__)").Output(); err == nil {
			r.machine.Scipy = strings.TrimSpace(string(out))
		}
	}
	return r, nil
}

// summarise turns the samples into the report's steady figures.
func (r *SoakReport) summarise(procs []soakProcSample, goroutines, gcs, goHeap []point) {
	r.GCAt = -1
	if len(gcs) > 0 {
		r.GCAt = firstIncrease(gcs)
		r.GCs = int(gcs[len(gcs)-1].V - gcs[0].V)
	}
	r.WarmUp, r.Window = soakWindows(r.Run, r.GCAt)
	var rss, threads, fds, ticks []point
	var load []float64
	for _, p := range procs {
		rss = append(rss, point{p.At, float64(p.RSS)})
		threads = append(threads, point{p.At, float64(p.Threads)})
		fds = append(fds, point{p.At, float64(p.FDs)})
		ticks = append(ticks, point{p.At, float64(p.Ticks)})
		r.PeakRSS = max(r.PeakRSS, p.HWM)
		if p.At >= 0 && p.At <= r.Run {
			load = append(load, p.Load)
			r.LoadMax = max(r.LoadMax, p.Load)
		}
	}
	for _, l := range load {
		r.LoadMean += l / float64(len(load))
	}
	r.RSS = steadyOf(rss, r.WarmUp, r.Window, r.Run)
	r.Threads = steadyOf(threads, r.WarmUp, r.Window, r.Run)
	r.FDs = steadyOf(fds, r.WarmUp, r.Window, r.Run)
	// /metrics is scraped less often than /proc is read: its windows hold
	// fewer samples, but the last scrape (just before the stop) is in.
	r.Goroutines = steadyOf(goroutines, r.WarmUp, r.Window, r.Run+time.Second)
	r.GoHeap = steadyOf(goHeap, r.WarmUp, r.Window, r.Run+time.Second)
	r.CPUMean, r.CPUMax = cpuPercent(ticks, r.WarmUp, r.Run)
}

// readLog counts the warnings and errors of the daemon's JSON log and
// finds the Python it embedded.
func (r *SoakReport) readLog() {
	f, err := os.Open(r.Log)
	if err != nil {
		return
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var l struct {
			Level, Msg                 string
			Executable, Version, Numpy string
			Error                      string
		}
		if json.Unmarshal(sc.Bytes(), &l) != nil {
			continue
		}
		switch l.Level {
		case "warn":
			r.LogWarnings++
		case "error", "dpanic", "panic", "fatal":
			r.LogErrors++
			if r.FirstLogError == "" {
				r.FirstLogError = strings.TrimSpace(l.Msg + " " + l.Error)
			}
		}
		if l.Msg == "python started" {
			r.pythonExe, r.python, r.numpy = l.Executable, l.Version, l.Numpy
		}
	}
}

// soakConfig is the daemon's configuration for the soak.
func soakConfig(o SoakOptions, recDir string, port int) string {
	var b strings.Builder
	fmt.Fprintf(&b, "# written by ephysd soak\n[source]\ndriver = \"sim\"\n[source.sim]\nchannels = %d\nrate = %d\nrealtime = true\n", o.Channels, o.Rate)
	if o.QueueMS > 0 {
		fmt.Fprintf(&b, "[pipeline]\nqueue_ms = %s\n", floatTOML(o.QueueMS))
	}
	if o.Realtime {
		b.WriteString("[realtime]\npriority = 50\nlock_memory = true\n")
	}
	fmt.Fprintf(&b, "[[stage]]\nmodule = %q\n", o.Module)
	fmt.Fprintf(&b, "[recording]\nparent_directory = %q\n", recDir)
	fmt.Fprintf(&b, "[control]\nstart_mode = \"record\"\nhttp = \"127.0.0.1:%d\"\nsocket = %q\n", port, filepath.Join(o.Dir, "control.sock"))
	b.WriteString("[log]\nlevel = \"info\"\nformat = \"json\"\n")
	b.WriteString(o.ExtraTOML)
	return b.String()
}

// soakEnv is the daemon's environment: the soak's, without what would make
// it talk to a service manager that is not its own.
func soakEnv() []string {
	var env []string
	for _, e := range os.Environ() {
		k, _, _ := strings.Cut(e, "=")
		switch k {
		case "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID", "JOURNAL_STREAM", ReexecEnv:
			continue
		}
		env = append(env, e)
	}
	return env
}

// soakWaitReady waits until the daemon answers and records, with a block
// through the pipeline.
func soakWaitReady(ctx context.Context, api *soakAPI, exited <-chan error, limit time.Duration) (*ControlStatus, error) {
	deadline := time.After(limit)
	var lastErr error
	for {
		st, err := func() (*ControlStatus, error) {
			var st ControlStatus
			return &st, api.do("GET", "/api/ephysd/status", "", &st, false)
		}()
		switch {
		case err != nil:
			lastErr = err
		case st.Mode != Record || st.Recording == nil:
			lastErr = fmt.Errorf("mode %s (want RECORD): %s", st.Mode, st.LastError)
		case st.Pipeline == nil || st.Pipeline.Samples == 0:
			lastErr = errors.New("no block through the pipeline yet")
		default:
			return st, nil
		}
		select {
		case err := <-exited:
			return nil, fmt.Errorf("it exited: %v", err)
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-deadline:
			return nil, fmt.Errorf("not within %s: %v", limit, lastErr)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// soakCut ends the current recording (ACQUIRE) and starts the next one
// (RECORD), and returns the new segment.
func soakCut(api *soakAPI, r *SoakReport, cur *SoakSegment, curStart, ready time.Time, rate int) (*SoakSegment, error) {
	mode := func(m Mode) error {
		r.ModeChanges++
		var got modeJSON
		err := api.do("PUT", "/api/status", fmt.Sprintf(`{"mode": %q}`, m), &got, false)
		if err == nil && got.Mode != m {
			err = fmt.Errorf("PUT /api/status %s: the daemon is in %s", m, got.Mode)
		}
		if err != nil {
			r.ModeFailures++
		}
		return err
	}
	err := mode(Acquire)
	stopped := time.Now()
	cur.Wall = stopped.Sub(curStart)
	cur.Expect = uint64(cur.Wall.Seconds() * float64(rate))
	if err != nil {
		return nil, err
	}
	if err := mode(Record); err != nil {
		return nil, err
	}
	st, err := api.status()
	if err != nil {
		return nil, err
	}
	if st.Recording == nil {
		return nil, fmt.Errorf("the daemon reports no recording after RECORD (mode %s)", st.Mode)
	}
	return &SoakSegment{Path: st.Recording.Path, Start: time.Since(ready) - time.Duration(st.Recording.Seconds*float64(time.Second))}, nil
}

// soakChecker checks finished recordings one after the other while the
// soak goes on, and deletes them once checked (unless told to keep them
// or the check failed).
type soakChecker struct {
	o        SoakOptions
	progress func(string, ...any)
	queue    chan *SoakSegment
	done     chan struct{}
}

// newSoakChecker starts the checker.
func newSoakChecker(o SoakOptions, progress func(string, ...any)) *soakChecker {
	c := &soakChecker{o: o, progress: progress, queue: make(chan *SoakSegment, 1024), done: make(chan struct{})}
	go func() {
		defer close(c.done)
		for s := range c.queue {
			c.check(s)
		}
	}()
	return c
}

// add queues a finished recording for its check.
func (c *soakChecker) add(s *SoakSegment) { c.queue <- s }

// finish waits for every check.
func (c *soakChecker) finish() {
	close(c.queue)
	<-c.done
}

// check checks one recording and deletes it if it passed.
func (c *soakChecker) check(s *SoakSegment) {
	if s.Path == "" {
		s.Err = "the daemon named no recording folder"
		return
	}
	// The recorder finalises a recording at the block after the stop; wait
	// until its files no longer change.
	waitSettled(s.Path, 2*time.Second, 60*time.Second)
	for try := 0; ; try++ {
		s.Err = ""
		soakCheckRecording(c.o.Python, s)
		if s.consistent(c.o.Channels) || try == 2 {
			break
		}
		time.Sleep(3 * time.Second) // not finalised yet?
	}
	ok := s.consistent(c.o.Channels) && s.Gaps == 0 && s.Backwards == 0 && s.coversWall(c.o.Rate)
	c.progress("checked %s: %d samples (expected ≈ %d), %d gaps, ok=%v %s", soakSegmentName(s.Path), s.Samples, s.Expect, s.Gaps, ok, s.Err)
	if ok && !c.o.Keep {
		if err := os.RemoveAll(s.Path); err == nil {
			s.Removed = true
		}
	}
}

// waitSettled waits until the sizes of the files below dir have not changed
// for quiet, for at most limit.
func waitSettled(dir string, quiet, limit time.Duration) {
	deadline := time.Now().Add(limit)
	prev, since := int64(-1), time.Now()
	for time.Now().Before(deadline) {
		n := dirSize(dir)
		if n != prev {
			prev, since = n, time.Now()
		} else if time.Since(since) >= quiet {
			return
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// soakCheckRecording runs soakCheckScript over a recording folder.
func soakCheckRecording(python string, s *SoakSegment) {
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, python, "-I", "-c", soakCheckScript, s.Path)
	cmd.Env = []string{"PATH=/usr/bin:/bin", "LC_ALL=C.UTF-8", "HOME=" + os.TempDir()}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		msg := strings.TrimSpace(stderr.String())
		if strings.Contains(msg, "No module named 'neo'") {
			msg = "python3-neo is missing: apt-get install python3-neo"
		} else if i := strings.LastIndexByte(msg, '\n'); i >= 0 {
			msg = msg[i+1:] // the exception line of the traceback
		}
		s.Err = fmt.Sprintf("%s %s: %v: %s", python, "soak check", err, msg)
		return
	}
	var res struct {
		NeoSamples uint64  `json:"neo_samples"`
		Channels   int     `json:"channels"`
		Samples    uint64  `json:"sample_numbers"`
		Timestamps uint64  `json:"timestamps"`
		DatBytes   uint64  `json:"dat_bytes"`
		Gaps       uint64  `json:"gaps"`
		Missing    uint64  `json:"missing"`
		Backwards  uint64  `json:"backwards"`
		First      int64   `json:"first"`
		Last       int64   `json:"last"`
		TailStd    float64 `json:"tail_std"`
	}
	if err := json.Unmarshal(out, &res); err != nil {
		s.Err = fmt.Sprintf("soak check: unreadable answer %q: %v", out, err)
		return
	}
	s.Checked = true
	s.NeoSamples, s.Channels, s.Samples, s.Timestamps = res.NeoSamples, res.Channels, res.Samples, res.Timestamps
	if res.Channels > 0 {
		s.DatSamples = res.DatBytes / uint64(2*res.Channels)
	}
	s.Gaps, s.Missing, s.Backwards, s.TailStd = res.Gaps, res.Missing, res.Backwards, res.TailStd
	s.First, s.Last = res.First, res.Last
}

// tailFile is the last n lines of a file, for an error message.
func tailFile(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return path + ":\n" + strings.Join(lines, "\n")
}

// soakCommand is `ephysd soak`.
func soakCommand(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("ephysd soak", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprint(stderr, soakUsage)
		fs.PrintDefaults()
	}
	durationFlag := fs.String("duration", "10m", "how long to run, from the daemon's first block")
	channels := fs.Int("channels", 384, "simulated channels")
	rate := fs.Int("rate", 30000, "sample rate in Hz")
	module := fs.String("module", "examples/bandpass_filter.py", "the Python stage's module")
	out := fs.String("out", "", "working folder: the daemon's configuration, log and recordings (default: a new folder in $TMPDIR, removed after a run that met every goal)")
	segmentFlag := fs.String("segment", "10m", "start a new recording after this long; the finished one is checked, then deleted (0: one recording)")
	keep := fs.Bool("keep", false, "keep the recordings once checked")
	realtime := fs.Bool("realtime", false, "run the daemon with SCHED_FIFO priority 50 and locked memory (needs CAP_SYS_NICE and CAP_IPC_LOCK; the RSS then counts every mapped page)")
	queueMS := fs.Float64("queue-ms", 0, "the daemon's [pipeline] queue_ms (default its own: 1000)")
	writeDoc := fs.String("write-doc", "", "write the figures into the Soak section of this Markdown file, e.g. docs/RELIABILITY.md (not after Ctrl-C)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return usageError{fmt.Errorf("soak: unexpected argument %q", fs.Arg(0))}
	}
	duration, err := parseDuration("duration", *durationFlag)
	if err != nil {
		return err
	}
	segment, err := parseDuration("segment", *segmentFlag)
	if err != nil {
		return err
	}
	mod, err := filepath.Abs(*module)
	if err != nil {
		return err
	}
	if _, err := os.Stat(mod); err != nil {
		return fmt.Errorf("soak: module: %w (run from the repository root or pass --module)", err)
	}
	exe, err := os.Executable()
	if err != nil {
		return fmt.Errorf("soak: finding the ephysd executable: %w", err)
	}
	dir, temp := *out, false
	if dir == "" {
		if dir, err = os.MkdirTemp("", "ephysd-soak"); err != nil {
			return fmt.Errorf("soak: %w (pass --out)", err)
		}
		temp = true
	} else if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("soak: --out: %w", err)
	}
	if dir, err = filepath.Abs(dir); err != nil {
		return err
	}
	ctx, cancel := signalContext()
	defer cancel()
	fmt.Fprintf(stdout, "ephysd soak: %d ch × %d Hz, %s, %s, in %s\n", *channels, *rate, *module, duration, dir)
	r, err := RunSoak(ctx, SoakOptions{
		Exe: exe, Duration: duration, Channels: *channels, Rate: *rate, Module: mod, Dir: dir,
		Segment: segment, QueueMS: *queueMS, Realtime: *realtime, Keep: *keep, Progress: stderr,
	})
	if err != nil {
		if temp {
			os.RemoveAll(dir)
		}
		return err
	}
	r.Text(stdout)
	if *writeDoc != "" {
		if r.Interrupted {
			fmt.Fprintf(stdout, "soak: %s not written: the run was interrupted\n", *writeDoc)
		} else {
			cmd := "ephysd soak"
			if len(args) > 0 {
				cmd += " " + strings.Join(args, " ")
			}
			if err := writeSoakDoc(*writeDoc, cmd, r); err != nil {
				return err
			}
			fmt.Fprintf(stdout, "soak: wrote the figures into %s\n", *writeDoc)
		}
	}
	if r.Failed() {
		n := 0
		for _, g := range r.Goals() {
			if !g.Met {
				n++
			}
		}
		return fmt.Errorf("soak: %d goals not met (the table above); the daemon's log is %s", n, r.Log)
	}
	if temp && !*keep {
		os.RemoveAll(dir)
	}
	return nil
}

// The generated part of the Soak section lies between these markers;
// everything outside them is kept.
const (
	soakDocBegin = "<!-- ephysd soak: begin (written by `ephysd soak --write-doc`; edits between these markers are overwritten) -->"
	soakDocEnd   = "<!-- ephysd soak: end -->"
)

// writeSoakDoc writes the report between the markers of path, or, without
// markers, at the end of its "## Soak" section (a new section at the end
// when it has none).
func writeSoakDoc(path, command string, r *SoakReport) error {
	var s bytes.Buffer
	r.markdown(&s, command)
	old, err := os.ReadFile(path)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	doc, ok := spliceMarked(old, s.Bytes(), soakDocBegin, soakDocEnd)
	switch {
	case ok:
	default:
		h := bytes.Index(old, []byte("\n## Soak\n"))
		if h < 0 {
			doc = append(bytes.TrimRight(old, "\n"), "\n\n## Soak\n\n"...)
			doc = append(doc, s.Bytes()...)
			doc = append(doc, '\n')
			break
		}
		end := len(old) // the section ends at the next heading of its level
		if n := bytes.Index(old[h+1:], []byte("\n## ")); n >= 0 {
			end = h + 1 + n + 1
		}
		doc = append(doc, bytes.TrimRight(old[:end], "\n")...)
		doc = append(doc, "\n\n"...)
		doc = append(doc, s.Bytes()...)
		doc = append(doc, '\n')
		if end < len(old) {
			doc = append(doc, '\n')
			doc = append(doc, old[end:]...)
		}
	}
	return os.WriteFile(path, doc, 0o644)
}

// markdown writes the report for the doc, markers included.
func (r *SoakReport) markdown(w *bytes.Buffer, command string) {
	m := r.machine
	fmt.Fprintln(w, soakDocBegin)
	fmt.Fprintf(w, "### Latest soak (%s)\n\n", r.Started.Format("2006-01-02"))
	fmt.Fprintf(w, "`%s`, started %s, ran %s.\n\n", command, r.Started.Format("2006-01-02 15:04 MST"), r.Run.Round(time.Second))
	fmt.Fprintf(w, "**Machine.** %s, %d cores, %.0f GB RAM; Linux %s, Debian %s; %s; Python %s (%s), numpy %s, scipy %s. Recordings on %s. "+
		"Load average (1 min) during the run: mean %.2f, max %.2f on %d cores (everything on the machine, the daemon included).\n\n",
		m.CPU, m.Cores, m.MemoryGB, m.Kernel, m.Debian, m.Go, orDash(m.Python), orDash(m.Exe), orDash(m.Numpy), orDash(m.Scipy), m.Disk,
		r.LoadMean, r.LoadMax, r.Cores)
	fmt.Fprintln(w, "**Goals.**")
	fmt.Fprintln(w)
	r.goalsTable().markdown(w)
	fmt.Fprintln(w)
	fmt.Fprintln(w, "**Figures.**")
	fmt.Fprintln(w)
	r.figures().markdown(w)
	fmt.Fprintln(w)
	fmt.Fprintln(w, "**Over time.**")
	fmt.Fprintln(w)
	r.timelineTable().markdown(w)
	fmt.Fprintln(w)
	fmt.Fprintln(w, "**Recordings** (each checked with neo and numpy once finished, then deleted unless it failed):")
	fmt.Fprintln(w)
	r.segmentsTable().markdown(w)
	fmt.Fprint(w, soakDocEnd)
}
