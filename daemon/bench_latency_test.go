package daemon

import (
	"bytes"
	"image/png"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// A short latency run through two real pseudo-terminals, Python in the
// loop: every planted crossing reaches the fake Pulse Pal exactly once,
// and the histogram image is written. No timing bounds: machines are
// noisy; docs/PERFORMANCE.md has the figures of a full run.
func TestBenchLatencyShort(t *testing.T) {
	if testing.Short() {
		t.Skip("streams 2 × 1.5 s in real time")
	}
	if raceEnabled {
		t.Skip("real-time harness: make test runs it in its race-free pass")
	}
	img := filepath.Join(t.TempDir(), "latency.png")
	var progress bytes.Buffer
	rs, err := BenchLatency(LatencyOptions{
		Events: 200, BlockSizes: []int{1, 30}, Conditions: []string{LatencyIdle},
		PNG: img, Module: mustAbs(t, "../examples/threshold_ttl.py"), Progress: &progress,
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(rs) != 2 {
		t.Fatalf("%d results, want 2", len(rs))
	}
	for _, r := range rs {
		if r.Missed != 0 || r.Spurious != 0 {
			t.Errorf("block %d: %d missed, %d spurious triggers (matched %s)", r.Block, r.Missed, r.Spurious, r.Matching)
		}
		for name, q := range map[string]Quantiles{"fill": r.Fill, "software": r.Software, "total": r.Total,
			"split: to read": r.ToRead, "split: to written": r.ToWritten, "split: to the harness": r.ToHarness} {
			if q.N != 200 {
				t.Errorf("block %d %s: %d latencies, want 200", r.Block, name, q.N)
			}
			if !(q.P50 <= q.P90 && q.P90 <= q.P99 && q.P99 <= q.P999 && q.P999 <= q.Max) {
				t.Errorf("block %d %s: quantiles out of order: %+v", r.Block, name, q)
			}
		}
		if s := r.Software; s.P50 <= 0 || s.Max > 10*time.Second {
			t.Errorf("block %d: software latency %+v is not sane", r.Block, s)
		}
		if r.Fill.P50 < 0 || r.Total.P50 < r.Software.P50/2 {
			t.Errorf("block %d: fill %+v, total %+v", r.Block, r.Fill, r.Total)
		}
		// Each part of the split is a later moment than the one before
		// for most events (a descheduled thread can stamp late).
		if r.ToRead.P50 <= 0 || r.ToWritten.P50 <= 0 || r.ToHarness.P50 <= 0 {
			t.Errorf("block %d: split of (b) out of order: to read %+v, to written %+v, to the harness %+v", r.Block, r.ToRead, r.ToWritten, r.ToHarness)
		}
		if r.Inside.N == 0 || r.Python.N == 0 || r.DeviceLate.N == 0 {
			t.Errorf("block %d: no breakdown: %+v %+v %+v", r.Block, r.Inside, r.Python, r.DeviceLate)
		}
	}
	if n := strings.Count(progress.String(), "\n"); n != 2 {
		t.Errorf("%d progress lines, want 2:\n%s", n, progress.String())
	}
	f, err := os.Open(img)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	m, err := png.Decode(f)
	if err != nil {
		t.Fatalf("%s: %v", img, err)
	}
	if b := m.Bounds(); b.Dx() < 500 || b.Dy() < 200 {
		t.Fatalf("image %v", b)
	}
	var table bytes.Buffer
	PrintLatency(&table, rs)
	if !strings.Contains(table.String(), "| 30 | idle | (b) software |") || !strings.Contains(table.String(), "Goals") {
		t.Fatalf("table:\n%s", table.String())
	}
	t.Logf("\n%s\n%s", progress.String(), table.String())
}
