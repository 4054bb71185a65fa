package daemon

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/ephysd/ephysd/pyrt/isolated"
)

func TestConfigIsolation(t *testing.T) {
	dir := t.TempDir()
	mod := filepath.Join(dir, "m.py")
	os.WriteFile(mod, []byte(hookLogger), 0o644)
	doc := func(v string) []byte {
		return []byte(fmt.Sprintf("[[stage]]\nmodule = %q\nisolation = %q\n", mod, v))
	}
	for _, v := range []string{"process", "none", ""} {
		cfg, err := ParseConfig(filepath.Join(dir, "ok.toml"), doc(v))
		if err != nil {
			t.Fatalf("isolation = %q: %v", v, err)
		}
		if cfg.Stages[0].Isolation != v {
			t.Fatalf("isolation = %q read as %q", v, cfg.Stages[0].Isolation)
		}
	}
	_, err := ParseConfig(filepath.Join(dir, "bad.toml"), doc("thread"))
	if err == nil || !strings.Contains(err.Error(), "bad.toml:3: stage[1].isolation") || !strings.Contains(err.Error(), `"process"`) {
		t.Fatalf("isolation = \"thread\": %v", err)
	}
}

// dyingModule adds 100 µV to every sample; when the flag file next to it
// names a way to die, it overwrites half of its next block and dies that
// way (once).
const dyingModule = `
import ctypes, os

FLAG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "flag")

class PyProcessor:
    def __init__(self, processor, num_channels, sample_rate):
        pass
    def process(self, data):
        if os.path.exists(FLAG):
            how = open(FLAG).read().strip()
            os.remove(FLAG)
            data[:, : data.shape[1] // 2] = -5000.0  # half-written when it dies
            if how == "segfault":
                ctypes.string_at(0)
            elif how == "exit":
                os._exit(3)
            elif how == "hang":
                m = ctypes.create_string_buffer(64)
                libc = ctypes.CDLL(None)
                libc.pthread_mutex_lock(m)
                libc.pthread_mutex_lock(m)
        data += 100.0
`

// TestIsolatedStageSurvivesWorkerDeathsWhileRecording records the live
// simulator through an isolated stage whose worker dies four ways in a row
// (a segfault in native code, os._exit, SIGKILL as the out-of-memory
// killer sends it, a deadlock in native code that the block deadline ends)
// and reads the recording back with neo: its sample numbers run on without
// a gap, every sample is either the stage's output or, for the blocks
// while the worker was down, the raw input unchanged, in exactly four
// stretches of whole blocks; the worker came back each time and the
// stage's status went failed, then running again.
func TestIsolatedStageSurvivesWorkerDeathsWhileRecording(t *testing.T) {
	dir := t.TempDir()
	mod := filepath.Join(dir, "dying.py")
	os.WriteFile(mod, []byte(dyingModule), 0o644)
	path := filepath.Join(dir, "ephysd.toml")
	os.WriteFile(path, []byte(fmt.Sprintf(`
[source]
driver = "sim"
[source.sim]
channels = 4
[pipeline]
queue_ms = 10000
[python]
block_timeout_ms = 300
[[stage]]
module = %q
isolation = "process"
[recording]
parent_directory = %q
record_raw = true
[control]
http = ""
`, mod, filepath.Join(dir, "recs"))), 0o644)
	cfg, err := LoadConfig(path)
	if err != nil {
		t.Fatal(err)
	}
	svc, err := NewService(cfg, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	defer svc.Close()
	if err := svc.SetMode(Record); err != nil {
		t.Fatal(err)
	}
	if c := svc.Chain(); c.Python != nil {
		t.Fatal("ephysd started its own interpreter although every stage is isolated")
	}
	st, ok := svc.Stages()[0].(*isolated.Stage)
	if !ok {
		t.Fatalf("the stage is a %T, not an isolated one", svc.Stages()[0])
	}
	defer st.Close() // the service keeps its stages for the next acquisition
	waitUntil := func(what string, cond func() bool) {
		t.Helper()
		deadline := time.Now().Add(time.Minute)
		for !cond() {
			if time.Now().After(deadline) {
				t.Fatalf("gave up waiting for %s (status %+v)", what, st.Status())
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	samples := func() uint64 { return svc.Chain().Runner.Stats().Samples }

	var mu sync.Mutex
	var states []string
	stop := make(chan struct{})
	watched := make(chan struct{})
	go func() {
		defer close(watched)
		for {
			s := svc.Status().Stages[0].State
			mu.Lock()
			if n := len(states); n == 0 || states[n-1] != s {
				states = append(states, s)
			}
			mu.Unlock()
			select {
			case <-stop:
				return
			case <-time.After(5 * time.Millisecond):
			}
		}
	}()

	deaths := []string{"segfault", "exit", "sigkill", "hang"}
	for i, how := range deaths {
		waitUntil("a running worker", func() bool { return st.PID() != 0 && st.Status().State == "running" })
		from := samples()
		waitUntil("blocks through the worker", func() bool { return samples() > from+3000 })
		if how == "sigkill" {
			if err := syscall.Kill(st.PID(), syscall.SIGKILL); err != nil {
				t.Fatal(err)
			}
		} else if err := os.WriteFile(filepath.Join(dir, "flag"), []byte(how), 0o644); err != nil {
			t.Fatal(err)
		}
		waitUntil(how+": the restart", func() bool { return st.Restarts() == uint64(i+1) })
	}
	waitUntil("a running worker", func() bool { return st.PID() != 0 && st.Status().State == "running" })
	from := samples()
	waitUntil("blocks through the last worker", func() bool { return samples() > from+6000 })
	close(stop)
	<-watched
	status := svc.Status().Stages[0]
	stats := svc.Chain().Runner.Stats()
	session := svc.Session().Dir()
	if err := svc.SetMode(Idle); err != nil {
		t.Fatal(err)
	}
	if stats.OverrunBlocks != 0 || stats.Gaps != 0 {
		t.Fatalf("blocks were lost: %+v", stats)
	}
	if status.State != "running" || status.Errors < uint64(len(deaths)) || status.Worker == nil || status.Worker.Restarts != uint64(len(deaths)) ||
		!strings.Contains(status.Worker.LastExit, "killed by ephysd: no answer to process") {
		t.Fatalf("status %+v, worker %+v", status, status.Worker)
	}
	mu.Lock()
	seen := strings.Join(states, " ")
	mu.Unlock()
	if strings.Count(seen, "running failed") < len(deaths) {
		t.Fatalf("states seen: %s; want running → failed → running %d times", seen, len(deaths))
	}

	out := pyCheck(t, `
import sys, glob, os
import numpy as np
from neo.rawio.openephysbinaryrawio import OpenEphysBinaryRawIO

session, deaths = sys.argv[1], int(sys.argv[2])
r = OpenEphysBinaryRawIO(dirname=session)
r.parse_header()
streams = [s[0] for s in r.header["signal_streams"]]
main = [i for i, s in enumerate(streams) if s.endswith(".sim")]
raw = [i for i, s in enumerate(streams) if s.endswith(".sim_raw")]
assert len(main) == 1 and len(raw) == 1, streams
n = r.get_signal_size(0, 0, main[0])
assert n == r.get_signal_size(0, 0, raw[0]) and n > 0
got = r.get_analogsignal_chunk(0, 0, 0, n, main[0], None).astype(np.int64)
inp = r.get_analogsignal_chunk(0, 0, 0, n, raw[0], None).astype(np.int64)

rec = glob.glob(os.path.join(session, "Record Node *", "experiment1", "recording1"))[0]
sn = np.load(glob.glob(os.path.join(rec, "continuous", "*.sim", "sample_numbers.npy"))[0])
assert len(sn) == n and (np.diff(sn) == 1).all(), "the sample numbers have a gap"

# +100 µV at 0.195 µV per bit: 512 or 513 more, depending on rounding.
diff = got - inp
processed = ((diff == 512) | (diff == 513)).all(axis=1)
passed = (diff == 0).all(axis=1)
assert (processed | passed).all(), ("samples that are neither output nor input", np.argwhere(~(processed | passed))[:5])
assert processed[:30].all(), "the first block was not processed"
assert processed[-30:].all(), "the last block was not processed"
edges = np.flatnonzero(np.diff(passed.astype(np.int8)))
starts, ends = edges[0::2] + 1, edges[1::2] + 1
assert len(starts) == deaths and len(ends) == deaths, ("pass-through stretches", starts, ends)
first = int(sn[0])
for a, b in zip(starts, ends):
    assert (first + a) % 30 == 0 and (b - a) % 30 == 0, ("a stretch that is not whole blocks", a, b)
print("ok", n, [(int(a), int(b - a)) for a, b in zip(starts, ends)])
`, session, fmt.Sprint(len(deaths)))
	if !strings.HasPrefix(out, "ok") {
		t.Fatal(out)
	}
	t.Logf("recording: %s", strings.TrimSpace(out))
}

// TestExampleIsolatedRecordsLikeInProcess runs examples/isolated.toml
// (the band-pass filter isolated, the closed loop in process) over one
// second of the simulator, and again with isolation = "none": the two
// recordings are identical, samples and events, byte for byte.
func TestExampleIsolatedRecordsLikeInProcess(t *testing.T) {
	example := filepath.Join("..", "examples", "isolated.toml")
	data, err := os.ReadFile(example)
	if err != nil {
		t.Fatal(err)
	}
	record := func(isolation string) string {
		t.Helper()
		out := t.TempDir()
		doc := string(data)
		for _, r := range [][2]string{
			{"realtime = true", "realtime = false"},
			{`parent_directory = "../recordings"`, fmt.Sprintf("parent_directory = %q", out)},
			{`http = "127.0.0.1:37497"`, `http = ""`},
			{`isolation = "process"`, fmt.Sprintf("isolation = %q", isolation)},
		} {
			if !strings.Contains(doc, r[0]) {
				t.Fatalf("%s has no %s", example, r[0])
			}
			doc = strings.Replace(doc, r[0], r[1], 1)
		}
		cfg, err := ParseConfig(example, []byte(doc))
		if err != nil {
			t.Fatal(err)
		}
		c, err := Process(context.Background(), cfg, zap.NewNop(), time.Second, nil)
		if err != nil {
			t.Fatal(err)
		}
		if isolation == IsolationProcess && !isolatedStage(c.Stages[0]) || isolatedStage(c.Stages[1]) {
			t.Fatalf("isolation %q: stages %T, %T", isolation, c.Stages[0], c.Stages[1])
		}
		for _, s := range c.Stages {
			if st := s.Status(); st.State != "running" || st.Errors != 0 {
				t.Fatalf("isolation %q: stage %+v", isolation, st)
			}
			closeStage(s)
		}
		return filepath.Join(sessionDir(t, c), "Record Node 103", "experiment1", "recording1")
	}
	isolatedRec, inProcessRec := record(IsolationProcess), record(IsolationNone)
	for _, sub := range []string{
		filepath.Join("continuous", "Simulated_Headstage-100.sim"),
		filepath.Join("events", "Simulated_Headstage-100.sim", "TTL"),
		filepath.Join("events", "Python_Processor-102.sim", "TTL"),
	} {
		a, b := readAll(t, filepath.Join(isolatedRec, sub)), readAll(t, filepath.Join(inProcessRec, sub))
		for name, data := range b {
			if name == "timestamps.npy" || name == "sync_messages.txt" {
				continue
			}
			if !bytes.Equal(a[name], data) {
				t.Errorf("%s/%s differs between the isolated and the in-process run", sub, name)
			}
		}
	}
	if evs, _ := os.ReadFile(filepath.Join(isolatedRec, "events", "Python_Processor-102.sim", "TTL", "sample_numbers.npy")); len(evs) < 128+10*8 {
		t.Fatalf("the closed loop made %d events, want at least 10: the comparison proves little", (len(evs)-128)/8)
	}
}
