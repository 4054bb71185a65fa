// Package examples holds the Python modules users copy; this test runs each
// of them in the real pipeline (simulator → embedded Python → recorder) and
// checks what they do against an independent computation in Debian's Python.
package examples

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/ephysd/ephysd/daemon"
)

const capture = `
import os
import numpy as np
HERE = os.path.dirname(os.path.abspath(__file__))
NAME = os.path.splitext(os.path.basename(__file__))[0]
class PyProcessor:
    def __init__(self, processor, num_channels, sample_rate):
        self.chunks = []
    def process(self, data):
        self.chunks.append(data.copy())
    def stop_acquisition(self):
        np.save(os.path.join(HERE, NAME + ".npy"), np.concatenate(self.chunks, axis=1))
`

func abs(t *testing.T, p string) string {
	a, err := filepath.Abs(p)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// chain runs sim → capture_in → modules… → capture_out and returns the
// folder holding capture_in.npy / capture_out.npy and the chain.
func chain(t *testing.T, simTOML string, blockSamples int, modules ...string) (string, *daemon.Chain) {
	t.Helper()
	dir := t.TempDir()
	in := filepath.Join(dir, "capture_in.py")
	out := filepath.Join(dir, "capture_out.py")
	os.WriteFile(in, []byte(capture), 0o644)
	os.WriteFile(out, []byte(capture), 0o644)
	var doc strings.Builder
	fmt.Fprintf(&doc, "[source]\ndriver = \"sim\"\n[source.sim]\nrealtime = false\n%s\n", simTOML)
	fmt.Fprintf(&doc, "[pipeline]\nblock_samples = %d\n", blockSamples)
	fmt.Fprintf(&doc, "[recording]\nparent_directory = %q\n", filepath.Join(dir, "rec"))
	for _, m := range append(append([]string{in}, modules...), out) {
		fmt.Fprintf(&doc, "[[stage]]\nmodule = %q\n", m)
	}
	cfg, err := daemon.ParseConfig(filepath.Join(dir, "x.toml"), []byte(doc.String()))
	if err != nil {
		t.Fatal(err)
	}
	c, err := daemon.Process(context.Background(), cfg, zap.NewNop(), time.Second, nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range c.Stages {
		if st := s.Status(); st.State != "running" || st.Errors != 0 {
			t.Fatalf("stage %+v", st)
		}
	}
	return dir, c
}

func python(t *testing.T, script string, args ...string) string {
	t.Helper()
	cmd := exec.Command("/usr/bin/python3", append([]string{"-I", "-c", script}, args...)...)
	cmd.Env = []string{"PATH=/usr/bin:/bin", "LC_ALL=C.UTF-8"}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("python check: %v\n%s", err, out)
	}
	return string(out)
}

func TestTemplatePassesDataUnchanged(t *testing.T) {
	dir, _ := chain(t, "channels = 4", 30, abs(t, "template.py"))
	python(t, `
import sys, numpy as np
a = np.load(sys.argv[1] + "/capture_in.npy"); b = np.load(sys.argv[1] + "/capture_out.npy")
assert a.shape == (4, 30000) and (a == b).all()
`, dir)
}

// The band-pass output equals filtering the whole signal at once with scipy,
// for 30-sample blocks and for odd 7-sample blocks: block boundaries are
// seamless.
func TestBandpassFilterIsSeamless(t *testing.T) {
	for _, n := range []int{30, 7} {
		t.Run(fmt.Sprint(n), func(t *testing.T) {
			dir, _ := chain(t, "channels = 4", n, abs(t, "bandpass_filter.py"))
			out := python(t, `
import sys, numpy as np
from scipy import signal
sys.path.insert(0, sys.argv[2])
import bandpass_filter as bp
a = np.load(sys.argv[1] + "/capture_in.npy").astype(np.float64)
b = np.load(sys.argv[1] + "/capture_out.npy")
sos = signal.butter(bp.ORDER, [bp.LOW_HZ, bp.HIGH_HZ], btype="bandpass", fs=30000.0, output="sos")
whole = signal.sosfilt(sos, a, axis=1).astype(np.float32)
err = np.abs(whole - b).max()
assert err < 1e-3, err
# it does filter: the LFP oscillations (8 and 40 Hz) are gone, high frequencies stay
spec = lambda x: np.abs(np.fft.rfft(x[0]))  # 1 Hz bins for 1 s at 30 kHz
lfp = lambda x: spec(x)[[8, 40]].sum()
hi = lambda x: spec(x)[1000:5000].mean()
assert lfp(b) < 0.01 * lfp(a), (lfp(b), lfp(a))
assert 0.8 < hi(b) / hi(a) < 1.2, (hi(b), hi(a))
print("max error", err)
`, dir, abs(t, "."))
			t.Log(strings.TrimSpace(out))
		})
	}
}

// threshold_ttl emits a rising edge at every downward crossing of the
// threshold on channel 0 (outside the refractory period) and a falling edge
// one pulse later, at exact sample numbers; checked against crossings found
// offline in the captured input.
func TestThresholdTTLClosedLoop(t *testing.T) {
	dir, c := chain(t, "channels = 4\nspike_channels = [1, 3]\nunits = 2", 30, abs(t, "threshold_ttl.py"))
	session := c.Session.Dir()
	out := python(t, `
import sys, glob, os, numpy as np
sys.path.insert(0, sys.argv[3])
import threshold_ttl as th
x = np.load(sys.argv[1] + "/capture_in.npy")[th.CHANNEL]
thr = th.THRESHOLD_UV
hits = np.flatnonzero((x[:-1] > thr) & (x[1:] <= thr)) + 1
refractory = int(round(th.REFRACTORY_MS * 30)); pulse = int(round(th.PULSE_MS * 30))
rising = []
for h in hits:
    if not rising or h >= rising[-1] + refractory:
        rising.append(int(h))
assert len(rising) >= 3, ("too few crossings to test", len(rising))
ev = glob.glob(os.path.join(sys.argv[2], "Record Node *", "experiment1", "recording1", "events", "Python_Processor-102.sim", "TTL"))[0]
sn = np.load(ev + "/sample_numbers.npy"); st = np.load(ev + "/states.npy")
line = th.TTL_LINE + 1
assert list(sn[st == line]) == rising, (list(sn[st == line])[:5], rising[:5])
assert list(sn[st == -line]) == [r + pulse for r in rising if r + pulse < len(x)], "falling edges"
print(len(rising), "crossings")
`, dir, session, abs(t, "."))
	t.Log(strings.TrimSpace(out))
}
