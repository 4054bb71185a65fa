package daemon

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/ephysd/ephysd/drivers/sim"
	"github.com/ephysd/ephysd/pipeline"
)

// systemPython is Debian's interpreter, which has numpy, scipy and neo. A
// pyenv python3 first on PATH has none of them.
const systemPython = "/usr/bin/python3"

func pyCheck(t *testing.T, script string, args ...string) string {
	t.Helper()
	cmd := exec.Command(systemPython, append([]string{"-I", "-c", script}, args...)...)
	cmd.Env = []string{"PATH=/usr/bin:/bin", "LC_ALL=C.UTF-8", "HOME=" + t.TempDir()}
	out, err := cmd.CombinedOutput()
	if err != nil {
		if strings.Contains(string(out), "No module named 'neo'") {
			t.Fatalf("python3-neo is missing: apt-get install python3-neo (make test installs it)\n%s", out)
		}
		t.Fatalf("python check failed: %v\n%s", err, out)
	}
	return string(out)
}

func process(t *testing.T, doc string, duration time.Duration) *Chain {
	t.Helper()
	dir := t.TempDir()
	cfg, err := ParseConfig(filepath.Join(dir, "test.toml"), []byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	c, err := Process(context.Background(), cfg, zap.NewNop(), duration, nil)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func sessionDir(t *testing.T, c *Chain) string {
	t.Helper()
	d := c.Session.Dir()
	if d == "" {
		t.Fatal("nothing was recorded")
	}
	return d
}

const acceptanceModule = `
import os
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))

class PyProcessor:
    def __init__(self, processor, num_channels, sample_rate):
        self.p = processor
        self.chunks = []
        self.firsts = []
        self.ttl = []

    def handle_ttl_event(self, source_node, channel, sample_number, line, state):
        self.ttl.append((source_node, sample_number, line, int(state)))

    def process(self, data):
        data *= 0.75
        data[1] += 100.0
        data[2] = 7000.0      # clipped at int16: 7000 / 0.195 > 32767
        self.firsts.append((self.p.sample_number, data.shape[1]))
        self.chunks.append(data.copy())
        if self.p.sample_number % 3000 == 0:
            self.p.add_python_event(5, True, sample_number=self.p.sample_number + 3)
            self.p.add_python_event(5, False, sample_number=self.p.sample_number + 9)

    def stop_acquisition(self):
        np.save(os.path.join(HERE, "out.npy"), np.concatenate(self.chunks, axis=1))
        np.save(os.path.join(HERE, "firsts.npy"), np.array(self.firsts, dtype=np.int64))
        np.save(os.path.join(HERE, "ttl.npy"), np.array(self.ttl, dtype=np.int64).reshape(-1, 4))
`

// simEdges reads the simulator directly (not through the pipeline) and
// returns its TTL edges as (sample, line, state) for the first n samples.
func simEdges(t *testing.T, cfg sim.Config, n int64) [][3]int64 {
	t.Helper()
	cfg.Realtime = false
	src, err := cfg.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	if err := src.Start(); err != nil {
		t.Fatal(err)
	}
	pool, _ := pipeline.NewPool(1, cfg.Channels, 1000)
	defer pool.Close(false)
	b := pool.TryGet()
	defer b.Release()
	var prev uint64
	var edges [][3]int64
	for b.FirstSample+int64(b.Samples) < n {
		if err := src.ReadBlock(b); err != nil {
			t.Fatal(err)
		}
		for i := 0; i < b.Samples; i++ {
			w := b.Digital[i]
			for line := 0; line < 64; line++ {
				m := uint64(1) << line
				if (w^prev)&m != 0 && b.FirstSample+int64(i) < n {
					st := int64(0)
					if w&m != 0 {
						st = 1
					}
					edges = append(edges, [3]int64{b.FirstSample + int64(i), int64(line), st})
				}
			}
			prev = w
		}
	}
	return edges
}

// TestAcceptanceRecordingReadByNeo runs the simulator through a Python stage
// into a recording and reads it back with Debian's neo: the int16 values are
// round(output / bit_volts) of exactly what the stage produced, and the TTL
// events match the simulated lines sample for sample. Then the recording is
// played back and recorded again, reproducing it.
func TestAcceptanceRecordingReadByNeo(t *testing.T) {
	modDir := t.TempDir()
	module := filepath.Join(modDir, "acceptance.py")
	os.WriteFile(module, []byte(acceptanceModule), 0o644)
	out := t.TempDir()
	c := process(t, fmt.Sprintf(`
[source]
driver = "sim"
[source.sim]
channels = 8
realtime = false
[[stage]]
module = %q
[recording]
parent_directory = %q
record_raw = true
`, module, out), 2*time.Second)
	st := c.Runner.Stats()
	if st.OverrunBlocks != 0 || st.Processed != st.Blocks || st.Samples < 60000 {
		t.Fatalf("stats %+v", st)
	}
	if s := c.Stages[0].Status(); s.State != "running" {
		t.Fatalf("stage %+v", s)
	}
	session := sessionDir(t, c)
	simCfg := sim.DefaultConfig()
	simCfg.Channels = 8
	edges := simEdges(t, simCfg, int64(st.Samples))
	var edgeText strings.Builder
	for _, e := range edges {
		fmt.Fprintf(&edgeText, "%d,%d,%d;", e[0], e[1], e[2])
	}

	result := pyCheck(t, `
import sys, glob, os, json
import numpy as np
import neo
from neo.rawio.openephysbinaryrawio import OpenEphysBinaryRawIO

session, moddir, edges = sys.argv[1], sys.argv[2], sys.argv[3]
out = np.load(os.path.join(moddir, "out.npy")).astype(np.float64)
firsts = np.load(os.path.join(moddir, "firsts.npy"))
ttl_seen = np.load(os.path.join(moddir, "ttl.npy"))
n = out.shape[1]
# blocks are contiguous from sample 0
starts = np.cumsum(np.concatenate(([0], firsts[:-1, 1])))
assert (firsts[:, 0] == starts).all(), "block sample numbers are not contiguous"

r = OpenEphysBinaryRawIO(dirname=session)
r.parse_header()
streams = [s[0] for s in r.header["signal_streams"]]
main = [i for i, s in enumerate(streams) if s.endswith("Simulated_Headstage-100.sim")]
raw = [i for i, s in enumerate(streams) if s.endswith("Simulated_Headstage-100.sim_raw")]
assert len(main) == 1 and len(raw) == 1, streams
size = r.get_signal_size(0, 0, main[0])
assert size == n, (size, n)
got = r.get_analogsignal_chunk(0, 0, 0, size, main[0], None)
assert got.dtype == np.int16 and got.shape == (n, 8), (got.dtype, got.shape)
want = np.round(np.clip(out / 0.195, -32768, 32767)).astype(np.int16).T
bad = np.argwhere(got != want)
assert bad.size == 0, ("int16 values differ", bad[:5], got[tuple(bad[0])], want[tuple(bad[0])])
assert (got[:, 2] == 32767).all()

# TTL events of the source, exactly the simulated edges
rec = glob.glob(os.path.join(session, "Record Node *", "experiment1", "recording1"))[0]
ev = os.path.join(rec, "events", "Simulated_Headstage-100.sim", "TTL")
states = np.load(os.path.join(ev, "states.npy"))
sns = np.load(os.path.join(ev, "sample_numbers.npy"))
words = np.load(os.path.join(ev, "full_words.npy"))
ts = np.load(os.path.join(ev, "timestamps.npy"))
expected = [tuple(int(v) for v in e.split(",")) for e in edges.split(";") if e]
recorded = [(int(s), abs(int(st)) - 1, int(st > 0)) for s, st in zip(sns, states)]
assert recorded == expected, (recorded[:6], expected[:6])
assert np.allclose(ts, sns / 30000.0)
# line 0 is a 1 Hz square wave: rising at every second, falling half-way
line0 = [(s, st) for s, l, st in recorded if l == 0]
assert line0[:4] == [(0, 1), (15000, 0), (30000, 1), (45000, 0)], line0[:4]
assert any(l == 1 for _, l, _ in recorded), "no pulses on line 1"
# the stage's handle_ttl_event saw the same edges
seen = [(int(s), int(l), int(st)) for node, s, l, st in ttl_seen]
assert seen == expected, (seen[:4], expected[:4])

# neo 0.11 shows one TTL channel per recording (it names event streams by
# their last folder, "TTL"): the source's. The Python channel is checked below.
names = [c[0] for c in r.header["event_channels"]]
assert "TTL Input" in names, names
py = os.path.join(rec, "events", "Python_Processor-101.sim", "TTL")
psn = np.load(os.path.join(py, "sample_numbers.npy"))
pst = np.load(os.path.join(py, "states.npy"))
k = np.arange(0, n, 3000)
assert (psn[0::2] == k + 3).all() and (psn[1::2] == k + 9).all(), psn[:6]
assert (pst[0::2] == 6).all() and (pst[1::2] == -6).all(), pst[:6]

with open(os.path.join(rec, "structure.oebin")) as f:
    oebin = json.load(f)
assert oebin["continuous"][0]["num_channels"] == 8
print("ok", n)
`, session, modDir, edgeText.String())
	if !strings.HasPrefix(result, "ok") {
		t.Fatal(result)
	}

	// Playback of the recording, recorded again, reproduces it.
	out2 := t.TempDir()
	c2 := process(t, fmt.Sprintf(`
[source]
driver = "playback"
[source.playback]
path = %q
stream = "sim"
realtime = false
[recording]
parent_directory = %q
`, session, out2), 0)
	if got := c2.Runner.Stats().Samples; got != st.Samples {
		t.Fatalf("playback gave %d samples, want %d", got, st.Samples)
	}
	a := readAll(t, filepath.Join(session, "Record Node 102", "experiment1", "recording1", "continuous", "Simulated_Headstage-100.sim"))
	b := readAll(t, filepath.Join(sessionDir(t, c2), "Record Node 101", "experiment1", "recording1", "continuous", "Simulated_Headstage-100.sim"))
	for name, data := range a {
		if !bytes.Equal(data, b[name]) {
			t.Errorf("playback: %s differs", name)
		}
	}
	ea := readAll(t, filepath.Join(session, "Record Node 102", "experiment1", "recording1", "events", "Simulated_Headstage-100.sim", "TTL"))
	eb := readAll(t, filepath.Join(sessionDir(t, c2), "Record Node 101", "experiment1", "recording1", "events", "Simulated_Headstage-100.sim", "TTL"))
	for name, data := range ea {
		if !bytes.Equal(data, eb[name]) {
			t.Errorf("playback: events %s differ", name)
		}
	}
}

func readAll(t *testing.T, dir string) map[string][]byte {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	m := map[string][]byte{}
	for _, e := range entries {
		data, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		m[e.Name()] = data
	}
	if len(m) == 0 {
		t.Fatalf("%s is empty", dir)
	}
	return m
}

// TestRunStopsCleanlyOnSIGINT runs the real binary as `make run` does and
// stops it with Ctrl-C (SIGINT).
func TestRunStopsCleanlyOnSIGINT(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary")
	}
	bin := filepath.Join(t.TempDir(), "ephysd")
	build := exec.Command("go", "build", "-o", bin, "../cmd/ephysd")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	dir := t.TempDir()
	cfgPath := filepath.Join(dir, "ephysd.toml")
	os.WriteFile(cfgPath, []byte(fmt.Sprintf(`
[source]
driver = "sim"
[source.sim]
channels = 32
[[stage]]
module = %q
[[stage]]
module = %q
[recording]
parent_directory = "recs"
[control]
start_mode = "record"
http = ""
[log]
format = "console"
`, mustAbs(t, "../examples/bandpass_filter.py"), mustAbs(t, "../examples/threshold_ttl.py"))), 0o644)
	cmd := exec.Command(bin, "run", "--config", cfgPath)
	var stdout bytes.Buffer
	stderr, _ := cmd.StderrPipe()
	cmd.Stdout = &stdout
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	logs := make(chan string, 1)
	started := make(chan struct{})
	go func() {
		var all strings.Builder
		buf := make([]byte, 4096)
		signalled := false
		for {
			n, err := stderr.Read(buf)
			all.Write(buf[:n])
			if !signalled && strings.Contains(all.String(), "recording started") {
				signalled = true
				close(started)
			}
			if err == io.EOF || err != nil {
				logs <- all.String()
				return
			}
		}
	}()
	select {
	case <-started:
	case <-time.After(60 * time.Second):
		cmd.Process.Kill()
		t.Fatalf("did not start recording:\n%s", <-logs)
	}
	time.Sleep(700 * time.Millisecond)
	cmd.Process.Signal(syscall.SIGHUP) // reload the Python modules while recording
	time.Sleep(800 * time.Millisecond)
	cmd.Process.Signal(os.Interrupt)
	err := cmd.Wait()
	log := <-logs
	if err != nil {
		t.Fatalf("exit: %v\n%s\n%s", err, log, stdout.String())
	}
	if strings.Count(log, "python module loaded") != 4 {
		t.Fatalf("SIGHUP did not reload both modules:\n%s", log)
	}
	if !strings.Contains(log, `"reason": "signal"`) || !strings.Contains(stdout.String(), "overruns    0 blocks") {
		t.Fatalf("log:\n%s\nsummary:\n%s", log, stdout.String())
	}
	sessions, _ := filepath.Glob(filepath.Join(dir, "recs", "*"))
	if len(sessions) != 1 {
		t.Fatalf("sessions %v", sessions)
	}
	out := pyCheck(t, `
import sys
from neo.rawio.openephysbinaryrawio import OpenEphysBinaryRawIO
r = OpenEphysBinaryRawIO(dirname=sys.argv[1]); r.parse_header()
print(r.get_signal_size(0, 0, 0))
`, sessions[0])
	var n int
	fmt.Sscan(out, &n)
	if n < 30000 {
		t.Fatalf("only %d samples recorded in ~1.5 s", n)
	}
}

func mustAbs(t *testing.T, p string) string {
	a, err := filepath.Abs(p)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// Blocks of a single sample work end to end, and a message given to the
// runner is recorded under events/MessageCenter at the sample it arrived.
func TestOneSampleBlocksAndMessages(t *testing.T) {
	out := t.TempDir()
	cfg, err := ParseConfig(filepath.Join(out, "x.toml"), []byte(fmt.Sprintf(`
[source]
driver = "sim"
[source.sim]
channels = 4
rate = 1000
realtime = true
[pipeline]
block_ms = 0.1
[recording]
parent_directory = %q
`, out)))
	if err != nil {
		t.Fatal(err)
	}
	c, err := NewChain(cfg, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	if c.BlockSamples != 1 {
		t.Fatalf("block of %d samples, want 1", c.BlockSamples)
	}
	if _, err := c.StartRecording(); err != nil {
		t.Fatal(err)
	}
	if err := c.Start(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond)
	c.Runner.Message("stimulus on")
	time.Sleep(200 * time.Millisecond)
	if err := c.Stop(); err != nil {
		t.Fatal(err)
	}
	st := c.Runner.Stats()
	if st.Blocks != st.Samples || st.Samples < 300 || st.OverrunBlocks != 0 {
		t.Fatalf("stats %+v", st)
	}
	out2 := pyCheck(t, `
import sys, glob, numpy as np
rec = glob.glob(sys.argv[1] + "/Record Node */experiment1/recording1")[0]
text = np.load(rec + "/events/MessageCenter/text.npy")
sn = np.load(rec + "/events/MessageCenter/sample_numbers.npy")
cont = np.load(rec + "/continuous/Simulated_Headstage-100.sim/sample_numbers.npy")
assert list(text) == [b"stimulus on"], text
assert cont[0] <= sn[0] <= cont[-1] and 150 <= sn[0] <= 300, (sn, cont[0], cont[-1])
assert (np.diff(cont) == 1).all()
print("ok")
`, c.Session.Dir())
	if !strings.HasPrefix(out2, "ok") {
		t.Fatal(out2)
	}
}
