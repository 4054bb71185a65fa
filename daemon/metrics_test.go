package daemon

import (
	"fmt"
	"math"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"go.uber.org/zap"

	"github.com/ephysd/ephysd/drivers/pulsepal/pulsepaltest"
	"github.com/ephysd/ephysd/pipeline"
)

// raiseEvery is how often (in blocks) the metrics test's stage raises.
const raiseEvery = 10

var raisingModule = fmt.Sprintf(`
class PyProcessor:
    def __init__(self, processor, num_channels, sample_rate):
        self.n = 0
    def process(self, data):
        self.n += 1
        data *= 0.5
        if self.n %% %d == 0:
            raise ValueError("metrics test: every %dth block raises")
`, raiseEvery, raiseEvery)

// newMetricsService makes a service on the real-time simulator (4 channels
// at 30 kHz) with one Python stage, "raiser", that raises every
// raiseEvery blocks.
func newMetricsService(t testing.TB) *Service {
	t.Helper()
	dir := t.TempDir()
	mod := filepath.Join(dir, "raiser.py")
	if err := os.WriteFile(mod, []byte(raisingModule), 0o644); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "ephysd.toml")
	doc := fmt.Sprintf(`
[source]
driver = "sim"
[source.sim]
channels = 4
rate = 30000
realtime = true
[[stage]]
module = %q
name = "raiser"
[recording]
parent_directory = %q
[control]
http = ""
`, mod, filepath.Join(dir, "recs"))
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
	return svc
}

// scrape is one parsed /metrics answer.
type scrape map[string]*dto.MetricFamily

func doScrape(t testing.TB, m *Metrics) scrape {
	t.Helper()
	rec := httptest.NewRecorder()
	m.Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	if rec.Code != 200 {
		t.Fatalf("GET /metrics: %d %s", rec.Code, rec.Body)
	}
	var p expfmt.TextParser
	fams, err := p.TextToMetricFamilies(rec.Body)
	if err != nil {
		t.Fatalf("parsing /metrics: %v", err)
	}
	return fams
}

// find returns the metric of family name whose labels include labels
// ("key", "value", …), or nil.
func (s scrape) find(name string, labels ...string) *dto.Metric {
	f := s[name]
	if f == nil {
		return nil
	}
next:
	for _, m := range f.Metric {
		for i := 0; i+1 < len(labels); i += 2 {
			found := false
			for _, lp := range m.Label {
				if lp.GetName() == labels[i] && lp.GetValue() == labels[i+1] {
					found = true
				}
			}
			if !found {
				continue next
			}
		}
		return m
	}
	return nil
}

// value is a counter's or gauge's value; it fails when absent.
func (s scrape) value(t testing.TB, name string, labels ...string) float64 {
	t.Helper()
	m := s.find(name, labels...)
	if m == nil {
		t.Fatalf("%s%v is missing from /metrics", name, labels)
	}
	switch {
	case m.Counter != nil:
		return m.Counter.GetValue()
	case m.Gauge != nil:
		return m.Gauge.GetValue()
	}
	t.Fatalf("%s%v is neither a counter nor a gauge", name, labels)
	return 0
}

func (s scrape) histogram(t testing.TB, name string, labels ...string) *dto.Histogram {
	t.Helper()
	m := s.find(name, labels...)
	if m == nil || m.Histogram == nil {
		t.Fatalf("histogram %s%v is missing from /metrics", name, labels)
	}
	return m.Histogram
}

// quantile is the upper bound of the bucket holding the q-quantile.
func quantile(h *dto.Histogram, q float64) float64 {
	rank := q * float64(h.GetSampleCount())
	for _, b := range h.Bucket {
		if float64(b.GetCumulativeCount()) >= rank {
			return b.GetUpperBound()
		}
	}
	return math.Inf(1)
}

var counterNames = []string{
	"ephysd_samples_total", "ephysd_blocks_total", "ephysd_overrun_blocks_total", "ephysd_overrun_samples_total",
	"ephysd_gaps_total", "ephysd_gap_samples_total", "ephysd_events_total", "ephysd_recorder_bytes_total",
}

// counters returns every counter value (by name and labels) and every
// histogram's count and sum, for checking that none goes down.
func (s scrape) counters() map[string]float64 {
	out := map[string]float64{}
	for name, f := range s {
		for _, m := range f.Metric {
			key := name + fmt.Sprint(m.Label)
			switch {
			case f.GetType() == dto.MetricType_COUNTER:
				out[key] = m.Counter.GetValue()
			case m.Histogram != nil:
				out[key+"_count"] = float64(m.Histogram.GetSampleCount())
				out[key+"_sum"] = m.Histogram.GetSampleSum()
				for _, b := range m.Histogram.Bucket {
					out[fmt.Sprintf("%s_bucket_%g", key, b.GetUpperBound())] = float64(b.GetCumulativeCount())
				}
			}
		}
	}
	return out
}

func notDown(t *testing.T, what string, before, after scrape) {
	t.Helper()
	a := after.counters()
	for k, v := range before.counters() {
		if !strings.HasPrefix(k, "ephysd_") {
			continue // not ours
		}
		w, ok := a[k]
		if !ok {
			t.Errorf("%s: %s vanished (was %v)", what, k, v)
		} else if w < v {
			t.Errorf("%s: %s went down from %v to %v", what, k, v, w)
		}
	}
}

// TestMetricsOfARecordingService runs the service on the simulator through
// a Python stage that raises, records for about a second and checks what
// /metrics reports; then it stops and restarts acquisition (a new chain,
// whose counters start from zero) and checks that no counter went down.
func TestMetricsOfARecordingService(t *testing.T) {
	svc := newMetricsService(t)
	m := NewMetrics(svc)

	idle := doScrape(t, m)
	if v := idle.value(t, "ephysd_mode", "mode", "IDLE"); v != 1 {
		t.Fatalf("mode IDLE gauge %v before acquisition", v)
	}
	if v := idle.value(t, "ephysd_samples_total"); v != 0 {
		t.Fatalf("samples %v before acquisition", v)
	}
	if idle["go_goroutines"] == nil || idle["process_cpu_seconds_total"] == nil {
		t.Fatal("the Go and process collectors are missing")
	}

	start := time.Now()
	if err := svc.SetMode(Record); err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Second)
	// The recorder's byte count moves at checkpoints (about once a
	// second): wait for the first.
	var rec scrape
	for deadline := time.Now().Add(5 * time.Second); ; {
		rec = doScrape(t, m)
		if rec.value(t, "ephysd_recorder_bytes_total") > 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	elapsed := time.Since(start).Seconds()
	c := svc.Chain()

	samples := rec.value(t, "ephysd_samples_total")
	blocks := rec.value(t, "ephysd_blocks_total")
	const rate = 30000
	if samples < 0.5*rate || samples > 1.2*rate*elapsed+float64(c.BlockSamples) {
		t.Errorf("samples %v after %.2f s at %d Hz", samples, elapsed, rate)
	}
	if blocks*float64(c.BlockSamples) != samples {
		t.Errorf("%v blocks of %d samples but %v samples", blocks, c.BlockSamples, samples)
	}
	for _, mode := range []string{"IDLE", "ACQUIRE", "RECORD"} {
		want := 0.0
		if mode == "RECORD" {
			want = 1
		}
		if v := rec.value(t, "ephysd_mode", "mode", mode); v != want {
			t.Errorf("ephysd_mode{mode=%q} = %v while recording, want %v", mode, v, want)
		}
	}
	for _, q := range []string{"stages", "recorder"} {
		if v := rec.value(t, "ephysd_queue_blocks", "queue", q); v < 0 {
			t.Errorf("queue %s depth %v", q, v)
		}
	}
	for _, name := range counterNames {
		rec.value(t, name) // present
	}

	st := rec.histogram(t, "ephysd_stage_seconds", "stage", "raiser")
	if st.GetSampleCount() == 0 || float64(st.GetSampleCount()) > blocks {
		t.Errorf("stage histogram holds %d blocks of %v read", st.GetSampleCount(), blocks)
	}
	mean := st.GetSampleSum() / float64(st.GetSampleCount())
	p50, p99 := quantile(st, 0.5), quantile(st, 0.99)
	if !(mean > 1e-7 && mean < 0.05) || p50 > 0.05 || p99 > 1 || p50 > p99 {
		t.Errorf("stage time: mean %v s, p50 ≤ %v s, p99 ≤ %v s", mean, p50, p99)
	}
	t.Logf("stage: %d blocks, mean %.1f µs, p50 ≤ %g s, p99 ≤ %g s", st.GetSampleCount(), mean*1e6, p50, p99)

	lat := rec.histogram(t, "ephysd_block_latency_seconds")
	if lat.GetSampleCount() == 0 || quantile(lat, 0.5) > 0.1 {
		t.Errorf("latency: %d blocks, p50 ≤ %v s", lat.GetSampleCount(), quantile(lat, 0.5))
	}

	exc := rec.value(t, "ephysd_python_exceptions_total", "stage", "raiser")
	// Exceptions are read a little after the stage histogram: allow for
	// blocks processed in between.
	if exc < 1 || exc > float64(st.GetSampleCount())/raiseEvery+10 {
		t.Errorf("%v python exceptions in %d blocks through a stage raising every %d", exc, st.GetSampleCount(), raiseEvery)
	}

	bytes := rec.value(t, "ephysd_recorder_bytes_total")
	// Each sample frame takes 4 × int16 in continuous.dat and 8 + 8 bytes
	// of sample number and timestamp; plus a few .npy headers.
	if bytes <= 0 || bytes > samples*(4*2+16)+64<<10 {
		t.Errorf("recorder bytes %v for %v samples", bytes, samples)
	}
	cp := rec.histogram(t, "ephysd_recorder_checkpoint_seconds")
	if cp.GetSampleCount() == 0 || quantile(cp, 0.5) > 5 {
		t.Errorf("checkpoints: %d, p50 ≤ %v s", cp.GetSampleCount(), quantile(cp, 0.5))
	}
	t.Logf("after %.2f s: %v samples, %v blocks, %v exceptions, %v bytes recorded, %d checkpoints",
		elapsed, samples, blocks, exc, bytes, cp.GetSampleCount())

	// Stop: the chain's final values stay in the totals.
	if err := svc.SetMode(Idle); err != nil {
		t.Fatal(err)
	}
	stopped := doScrape(t, m)
	notDown(t, "RECORD → IDLE", rec, stopped)
	final := c.Runner.Stats()
	if v := stopped.value(t, "ephysd_samples_total"); v != float64(final.Samples) {
		t.Errorf("samples %v after stopping, the chain read %d", v, final.Samples)
	}
	if v := stopped.value(t, "ephysd_recorder_bytes_total"); v != float64(c.Recorder.BytesWritten()) {
		t.Errorf("recorder bytes %v after stopping, the recorder wrote %d", v, c.Recorder.BytesWritten())
	}
	if v := stopped.value(t, "ephysd_mode", "mode", "IDLE"); v != 1 {
		t.Errorf("mode IDLE gauge %v when idle", v)
	}
	notDown(t, "IDLE, scraped again", stopped, doScrape(t, m))

	// A new chain counts from zero; the exported counters go on.
	if err := svc.SetMode(Acquire); err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond)
	again := doScrape(t, m)
	notDown(t, "IDLE → ACQUIRE", stopped, again)
	if c2 := svc.Chain(); c2.Runner.Stats().Samples >= uint64(again.value(t, "ephysd_samples_total")) {
		t.Errorf("samples_total %v does not include the first acquisition (the new chain alone read %d)",
			again.value(t, "ephysd_samples_total"), c2.Runner.Stats().Samples)
	}
	if v := again.value(t, "ephysd_samples_total"); v <= stopped.value(t, "ephysd_samples_total") {
		t.Errorf("samples %v after 300 ms of a new acquisition, %v before", v, stopped.value(t, "ephysd_samples_total"))
	}
	if v := again.value(t, "ephysd_mode", "mode", "ACQUIRE"); v != 1 {
		t.Errorf("mode ACQUIRE gauge %v", v)
	}
	// A stop and start between two scrapes is folded in too.
	if err := svc.SetMode(Idle); err != nil {
		t.Fatal(err)
	}
	if err := svc.SetMode(Acquire); err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond)
	notDown(t, "ACQUIRE → IDLE → ACQUIRE between scrapes", again, doScrape(t, m))
}

const pulsingModule = `
class PyProcessor:
    def __init__(self, processor, num_channels, sample_rate):
        self.p = processor
        self.n = 0
    def process(self, data):
        self.n += 1
        if self.n % 20 == 0:
            self.p.add_python_event(0, True)
        elif self.n % 20 == 5:
            self.p.add_python_event(0, False)
`

// An [[output]] device is reported connected, then, once unplugged,
// disconnected, with its disconnect and dropped-event counters moving.
func TestMetricsOfAnOutputDevice(t *testing.T) {
	pp := pulsepaltest.Start(t, pulsepaltest.Options{})
	dir := t.TempDir()
	mod := filepath.Join(dir, "pulser.py")
	if err := os.WriteFile(mod, []byte(pulsingModule), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg, err := ParseConfig(filepath.Join(dir, "x.toml"), []byte(fmt.Sprintf(`
[source]
driver = "sim"
[source.sim]
channels = 2
[[stage]]
module = %q
[[output]]
driver = "pulsepal"
[output.pulsepal]
path = %q
[[output.pulsepal.map]]
line = 0
channel = 2
mode = "trigger"
[recording]
parent_directory = %q
[control]
http = ""
`, mod, pp.Path, filepath.Join(dir, "recs"))))
	if err != nil {
		t.Fatal(err)
	}
	svc, err := NewService(cfg, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { svc.Close() })
	m := NewMetrics(svc)
	if err := svc.SetMode(Acquire); err != nil {
		t.Fatal(err)
	}
	const dev = "output 1 (pulsepal)"
	s := doScrape(t, m)
	if v := s.value(t, "ephysd_device_connected", "device", dev); v != 1 {
		t.Fatalf("%s connected = %v", dev, v)
	}
	if v := s.value(t, "ephysd_device_disconnects_total", "device", dev); v != 0 {
		t.Fatalf("%s disconnects = %v before unplugging", dev, v)
	}
	pp.WaitMessages(1, 2*time.Second) // it triggers
	// Garbage among its replies reaches the device's link counters.
	if err := pp.Send([]byte{0x55, 0x66, 0x77}); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		s = doScrape(t, m)
		if s.value(t, "ephysd_device_discarded_bytes_total", "device", dev) == 3 && s.value(t, "ephysd_device_resyncs_total", "device", dev) == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s after 3 bytes of garbage: discarded %v, resyncs %v", dev,
				s.value(t, "ephysd_device_discarded_bytes_total", "device", dev), s.value(t, "ephysd_device_resyncs_total", "device", dev))
		}
	}
	pp.Unplug()
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		s = doScrape(t, m)
		if s.value(t, "ephysd_device_disconnects_total", "device", dev) >= 1 &&
			s.value(t, "ephysd_output_dropped_event_blocks_total", "device", dev) >= 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("unplugged %s: connected %v, disconnects %v, dropped %v", dev,
				s.value(t, "ephysd_device_connected", "device", dev),
				s.value(t, "ephysd_device_disconnects_total", "device", dev),
				s.value(t, "ephysd_output_dropped_event_blocks_total", "device", dev))
		}
	}
	if v := s.value(t, "ephysd_device_connected", "device", dev); v != 0 {
		t.Errorf("%s connected = %v after unplugging", dev, v)
	}
	if v := s.value(t, "ephysd_device_discarded_bytes_total", "device", dev); v != 3 {
		t.Errorf("%s discarded bytes = %v after unplugging, want the 3 counted before", dev, v)
	}
	// The counts outlive the chain.
	if err := svc.SetMode(Idle); err != nil {
		t.Fatal(err)
	}
	idle := doScrape(t, m)
	notDown(t, "after stopping", s, idle)
	if idle.find("ephysd_device_connected", "device", dev) != nil {
		t.Errorf("a device of a stopped acquisition is still reported connected or not")
	}
}

// Snapshot's cumulative counts put each duration at or below the first
// bound it does not exceed, to the histogram's bucket precision.
func TestHistogramSnapshotBuckets(t *testing.T) {
	var h pipeline.Histogram
	for _, d := range []time.Duration{5 * time.Microsecond, 20 * time.Microsecond, 20 * time.Microsecond, 3 * time.Millisecond, 20 * time.Second} {
		h.Record(d)
	}
	counts, sum, n := h.Snapshot(metricBounds)
	if n != 5 || sum != 5*time.Microsecond+40*time.Microsecond+3*time.Millisecond+20*time.Second {
		t.Fatalf("n %d sum %v", n, sum)
	}
	want := map[time.Duration]uint64{10 * time.Microsecond: 1, 25 * time.Microsecond: 3, 2500 * time.Microsecond: 3, 5 * time.Millisecond: 4, 10 * time.Second: 4}
	for i, b := range metricBounds {
		if w, ok := want[b]; ok && counts[i] != w {
			t.Errorf("le %v: %d, want %d (all: %v)", b, counts[i], w, counts)
		}
		if i > 0 && counts[i] < counts[i-1] {
			t.Errorf("counts not cumulative: %v", counts)
		}
	}
	// A bound inside one of the histogram's ~3% buckets.
	var e pipeline.Histogram
	e.Record(100 * time.Microsecond)
	c, _, _ := e.Snapshot([]time.Duration{97 * time.Microsecond, 100 * time.Microsecond, 104 * time.Microsecond})
	if c[0] != 0 || c[2] != 1 {
		t.Errorf("100 µs against 97/100/104 µs bounds: %v", c)
	}
}

// BenchmarkMetricsScrape is one GET /metrics of an acquiring service with a
// Python stage: our collector plus the Go and process collectors, encoded.
func BenchmarkMetricsScrape(b *testing.B) {
	svc := newMetricsService(b)
	if err := svc.SetMode(Acquire); err != nil {
		b.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond)
	h := NewMetrics(svc).Handler()
	req := httptest.NewRequest("GET", "/metrics", nil)
	b.ReportAllocs()
	for b.Loop() {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		if rec.Code != 200 {
			b.Fatal(rec.Code)
		}
	}
}

// BenchmarkMetricsCollect is our collector alone (reading the service and
// building the metrics, no encoding).
func BenchmarkMetricsCollect(b *testing.B) {
	svc := newMetricsService(b)
	if err := svc.SetMode(Acquire); err != nil {
		b.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond)
	m := NewMetrics(svc)
	b.ReportAllocs()
	for b.Loop() {
		ch := make(chan prometheus.Metric, 64)
		go func() { m.Collect(ch); close(ch) }()
		for range ch {
		}
	}
}
