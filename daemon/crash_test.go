package daemon

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"math"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/ephysd/ephysd/drivers/sim"
	"github.com/ephysd/ephysd/pipeline"
	"github.com/ephysd/ephysd/recording"
)

// longTests runs the long versions (make soak sets it).
var longTests = os.Getenv("EPHYSD_LONG_TESTS") == "1"

// lockedBuffer is a bytes.Buffer safe for a writer and a reader.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// daemonProc is a running `ephysd run` of the real binary.
type daemonProc struct {
	cmd    *exec.Cmd
	stderr *lockedBuffer
	stdout *lockedBuffer
	socket string
	done   chan struct{}
	err    error // Wait's result, once done is closed
}

// startDaemon starts `ephysd run --config cfg [args]`; its control socket
// is socket.
func startDaemon(t *testing.T, bin, cfg, socket string, args ...string) *daemonProc {
	t.Helper()
	d := &daemonProc{stderr: &lockedBuffer{}, stdout: &lockedBuffer{}, socket: socket, done: make(chan struct{})}
	d.cmd = exec.Command(bin, append([]string{"run", "--config", cfg}, args...)...)
	d.cmd.Stderr, d.cmd.Stdout = d.stderr, d.stdout
	if err := d.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		d.err = d.cmd.Wait()
		close(d.done)
	}()
	t.Cleanup(func() {
		select {
		case <-d.done:
		default:
			d.cmd.Process.Kill()
			<-d.done
		}
	})
	return d
}

// status asks the daemon for /api/ephysd/status over its socket.
func (d *daemonProc) status() (*ControlStatus, error) {
	c, err := newClient(d.socket)
	if err != nil {
		return nil, err
	}
	var st ControlStatus
	if _, err := c.call("GET", "/api/ephysd/status", nil, &st); err != nil {
		return nil, err
	}
	return &st, nil
}

// waitStatus polls the status until cond holds (limit: a hang guard).
func (d *daemonProc) waitStatus(t *testing.T, what string, limit time.Duration, cond func(*ControlStatus) bool) *ControlStatus {
	t.Helper()
	deadline := time.Now().Add(limit)
	for {
		select {
		case <-d.done:
			t.Fatalf("ephysd exited (%v) while waiting for %s:\n%s", d.err, what, d.stderr)
		default:
		}
		if st, err := d.status(); err == nil && cond(st) {
			return st
		}
		if time.Now().After(deadline) {
			t.Fatalf("no %s within %s:\n%s", what, limit, d.stderr)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// wait waits for the daemon to exit (limit: a hang guard).
func (d *daemonProc) wait(t *testing.T, limit time.Duration) error {
	t.Helper()
	select {
	case <-d.done:
		return d.err
	case <-time.After(limit):
		d.cmd.Process.Kill()
		<-d.done
		t.Fatalf("ephysd did not exit within %s:\n%s", limit, d.stderr)
		return nil
	}
}

// eventingPassThrough is a Python stage that leaves the samples as they are and
// toggles line 1 of its event channel every 50 blocks (so that every
// recording has events: neo 0.11 cannot open one without).
const eventingPassThrough = `
class PyProcessor:
    def __init__(self, processor, num_channels, sample_rate):
        self.p = processor
        self.n = 0
        self.on = False
    def process(self, data):
        self.n += 1
        if self.n % 50 == 1:
            self.on = not self.on
            self.p.add_python_event(1, self.on)
`

// crashConfig writes a configuration: the simulator (8 channels, seed 7),
// the stage module, recording into dir/recs with flush_ms, control socket
// in dir.
func crashConfig(t *testing.T, dir, module, startMode string, flushMS int, simExtra string) (path, socket string) {
	t.Helper()
	socket = filepath.Join(dir, "control.sock")
	path = filepath.Join(dir, "ephysd.toml")
	doc := fmt.Sprintf(`
[source]
driver = "sim"
[source.sim]
channels = 8
seed = 7
%s
[[stage]]
module = %q
[recording]
parent_directory = %q
flush_ms = %d
[control]
start_mode = %q
http = ""
socket = %q
[log]
format = "json"
`, simExtra, module, filepath.Join(dir, "recs"), flushMS, startMode, socket)
	if err := os.WriteFile(path, []byte(doc), 0o644); err != nil {
		t.Fatal(err)
	}
	return path, socket
}

// recordingDirs lists the recording folders below root, sorted.
func recordingDirs(t *testing.T, root string) []string {
	t.Helper()
	var out []string
	filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err == nil && d.IsDir() && strings.HasPrefix(d.Name(), "recording") && strings.Contains(p, "experiment") {
			out = append(out, p)
			return fs.SkipDir
		}
		return nil
	})
	sort.Strings(out)
	return out
}

// treeFiles reads every file below dir, by relative path.
func treeFiles(t *testing.T, dir string) map[string][]byte {
	t.Helper()
	m := map[string][]byte{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		data, err := os.ReadFile(p)
		rel, _ := filepath.Rel(dir, p)
		m[rel] = data
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// simSamples generates what the simulator of cfg produces for sample
// numbers 0..n-1 (channel-major per block, returned sample-major).
func simSamples(t *testing.T, cfg sim.Config, n int64) []float32 {
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
	nch := cfg.Channels
	pool, _ := pipeline.NewPool(1, nch, 30)
	defer pool.Close(false)
	b := pool.TryGet()
	defer b.Release()
	out := make([]float32, 0, n*int64(nch))
	for int64(len(out)) < n*int64(nch) {
		if err := src.ReadBlock(b); err != nil {
			t.Fatal(err)
		}
		for i := 0; i < b.Samples && int64(len(out)) < n*int64(nch); i++ {
			for c := 0; c < nch; c++ {
				out = append(out, b.Data[c*b.Samples+i])
			}
		}
	}
	return out
}

// recordedStream is the main continuous stream of a recording folder.
type recordedStream struct {
	dir      string
	channels int
	sn       []int64
	dat      []byte
}

func readStream(t *testing.T, recDir string) *recordedStream {
	t.Helper()
	folders, _ := filepath.Glob(filepath.Join(recDir, "continuous", "*"))
	if len(folders) != 1 {
		t.Fatalf("%s: continuous streams %v, want one", recDir, folders)
	}
	rs := &recordedStream{dir: recDir}
	rs.sn = readNpyInt64(t, filepath.Join(folders[0], "sample_numbers.npy"))
	var err error
	if rs.dat, err = os.ReadFile(filepath.Join(folders[0], "continuous.dat")); err != nil {
		t.Fatal(err)
	}
	if len(rs.sn) > 0 {
		rs.channels = len(rs.dat) / 2 / len(rs.sn)
	}
	return rs
}

// checkAgainstSim checks that every recorded sample equals the
// simulator's value at its sample number, rounded to int16 at bit_volts,
// and that no sample number is missing between the first and the last.
func checkAgainstSim(t *testing.T, rs *recordedStream, cfg sim.Config) {
	t.Helper()
	n := len(rs.sn)
	if n == 0 {
		t.Fatalf("%s holds no sample", rs.dir)
	}
	if rs.channels != cfg.Channels || len(rs.dat) != n*2*cfg.Channels {
		t.Fatalf("%s: continuous.dat %d bytes for %d samples of %d channels", rs.dir, len(rs.dat), n, cfg.Channels)
	}
	for i := 1; i < n; i++ {
		if rs.sn[i] != rs.sn[i-1]+1 {
			t.Fatalf("%s: sample numbers jump from %d to %d", rs.dir, rs.sn[i-1], rs.sn[i])
		}
	}
	want := simSamples(t, cfg, rs.sn[n-1]+1)
	for i := 0; i < n; i++ {
		k := rs.sn[i]
		for c := 0; c < cfg.Channels; c++ {
			v := math.RoundToEven(float64(want[k*int64(cfg.Channels)+int64(c)]) / sim.BitVolts)
			v = math.Max(math.MinInt16, math.Min(math.MaxInt16, v))
			if got := int16(binary.LittleEndian.Uint16(rs.dat[2*(i*cfg.Channels+c):])); got != int16(v) {
				t.Fatalf("%s: sample %d channel %d is %d, the simulator's value is %d", rs.dir, k, c, got, int16(v))
			}
		}
	}
}

// neoSummary reads each session folder with Debian's neo and prints, per
// recording, the signal size, the sha256 of the int16 samples and the
// event counts.
const neoSummary = `
import sys, json, hashlib
from neo.rawio.openephysbinaryrawio import OpenEphysBinaryRawIO
out = {}
for session in sys.argv[1:]:
    io = OpenEphysBinaryRawIO(dirname=session)
    io.parse_header()
    segs = []
    for b in range(io.header['nb_block']):
        for s in range(io.header['nb_segment'][b]):
            n = io.get_signal_size(b, s, 0)
            chunk = io.get_analogsignal_chunk(block_index=b, seg_index=s, i_start=0, i_stop=n, stream_index=0)
            ev = {str(io.header['event_channels'][e]['name']): int(io.event_count(b, s, e)) for e in range(len(io.header['event_channels']))}
            segs.append({'size': int(n), 'sha256': hashlib.sha256(chunk.tobytes()).hexdigest(), 'events': ev})
    out[session] = segs
print(json.dumps(out))
`

type neoSegment struct {
	Size   int            `json:"size"`
	SHA256 string         `json:"sha256"`
	Events map[string]int `json:"events"`
}

func neoRead(t *testing.T, sessions ...string) map[string][]neoSegment {
	t.Helper()
	var out map[string][]neoSegment
	if err := json.Unmarshal([]byte(pyCheck(t, neoSummary, sessions...)), &out); err != nil {
		t.Fatal(err)
	}
	return out
}

// sessionOf is the session folder of a recording folder.
func sessionOf(recDir string) string {
	return filepath.Dir(filepath.Dir(filepath.Dir(recDir)))
}

// checkConsistent checks that a recording needs no recovery: no marker,
// and recording.Recover finds nothing to change.
func checkConsistent(t *testing.T, recDir string) {
	t.Helper()
	if _, err := os.Stat(filepath.Join(recDir, recording.UnfinishedMarker)); err == nil {
		t.Errorf("%s still has its not-finalised marker", recDir)
	}
	rep, err := recording.Recover(recDir)
	if err != nil {
		t.Fatal(err)
	}
	if rep.Changed() || rep.Err() != nil || rep.Recordings[0].Unfinished {
		t.Errorf("%s is not consistent:\n%s", recDir, rep)
	}
}

// TestKillDuringRecordingRecovers kills (SIGKILL) the real daemon at a
// random moment while it records the simulator through a Python stage
// with flush_ms = 100, several times. Each killed recording is recovered
// twice: by `ephysd recover` on a copy, and by the next daemon's start-up;
// the two must be identical. Then every recording is consistent, neo reads
// it, every sample it holds equals the simulator's, and it holds every
// sample up to at most 1 s before the kill (the loss per kill is logged).
func TestKillDuringRecordingRecovers(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the daemon")
	}
	trials := 3
	if longTests {
		trials = 20
	}
	const flushMS = 100
	bin := buildBinary(t)
	dir := t.TempDir()
	mod := filepath.Join(dir, "pass.py")
	os.WriteFile(mod, []byte(eventingPassThrough), 0o644)
	cfgPath, socket := crashConfig(t, dir, mod, "record", flushMS, "")
	cfg, err := LoadConfig(cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	simCfg := *cfg.Driver.(*sim.Config)
	cliRoot := filepath.Join(dir, "cli")
	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 1))

	type trial struct {
		rec         string
		samplesKill int64 // samples read by the source at the kill, at most
		queued      int64 // samples in the pipeline's queues just before it
	}
	var done []trial
	var prev *daemonProc
	for i := 0; i < trials; i++ {
		d := startDaemon(t, bin, cfgPath, socket)
		st := d.waitStatus(t, "recording", 60*time.Second, func(st *ControlStatus) bool { return st.Recording != nil })
		recDir := st.Recording.Path
		if prev != nil {
			// This start recovered the previous trial's recording.
			want := done[len(done)-1].rec
			if !strings.Contains(d.stderr.String(), "recovered a recording that ephysd did not finalise") ||
				!strings.Contains(d.stderr.String(), want) {
				t.Errorf("trial %d: the daemon's start did not log the recovery of %s:\n%s", i, want, d.stderr)
			}
		}
		delay := time.Duration(200+rng.IntN(1300)) * time.Millisecond
		time.Sleep(delay)
		t0 := time.Now()
		st, err := d.status()
		if err != nil {
			t.Fatalf("trial %d: status: %v\n%s", i, err, d.stderr)
		}
		if err := d.cmd.Process.Signal(syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		since := time.Since(t0)
		d.wait(t, 30*time.Second)
		upper := int64(st.Pipeline.Samples) + int64(math.Ceil(since.Seconds()*float64(simCfg.Rate))) + int64(st.Pipeline.BlockSamples)
		if _, err := os.Stat(filepath.Join(recDir, recording.UnfinishedMarker)); err != nil {
			t.Fatalf("trial %d: the killed recording has no marker: %v", i, err)
		}
		queued := int64(st.Pipeline.QueueStages+st.Pipeline.QueueRecorder) * int64(st.Pipeline.BlockSamples)
		done = append(done, trial{rec: recDir, samplesKill: upper, queued: queued})
		t.Logf("trial %d: killed %v after the recording started", i, delay)

		// `ephysd recover` on a copy.
		session := sessionOf(recDir)
		copyDir := filepath.Join(cliRoot, fmt.Sprint(i), filepath.Base(session))
		copyTree(t, session, copyDir)
		out, err := exec.Command(bin, "recover", copyDir).CombinedOutput()
		if err != nil || !strings.Contains(string(out), "(not finalised)") || !strings.Contains(string(out), "1 recordings checked: 1 not finalised, 1 fixed") {
			t.Fatalf("trial %d: ephysd recover: %v\n%s", i, err, out)
		}
		prev = d
	}
	// One more start recovers the last trial's recording.
	last := startDaemon(t, bin, cfgPath, socket, "--duration", "200ms")
	if err := last.wait(t, 60*time.Second); err != nil {
		t.Fatalf("the last start: %v\n%s", err, last.stderr)
	}
	if !strings.Contains(last.stderr.String(), done[len(done)-1].rec) {
		t.Errorf("the last start did not log the recovery of %s:\n%s", done[len(done)-1].rec, last.stderr)
	}
	// The recordings, as recovered by the daemon and by the CLI.
	var sessions []string
	var maxLoss, maxRecorderLoss float64
	for i, tr := range done {
		checkConsistent(t, tr.rec)
		session := sessionOf(tr.rec)
		sessions = append(sessions, session)
		copyDir := filepath.Join(cliRoot, fmt.Sprint(i), filepath.Base(session))
		a, b := treeFiles(t, session), treeFiles(t, copyDir)
		for p, data := range a {
			if !bytes.Equal(data, b[p]) {
				t.Errorf("trial %d: %s differs between the daemon's recovery and ephysd recover's", i, p)
			}
		}
		if len(a) != len(b) {
			t.Errorf("trial %d: %d files after the daemon's recovery, %d after ephysd recover's", i, len(a), len(b))
		}
		rs := readStream(t, tr.rec)
		checkAgainstSim(t, rs, simCfg)
		lastSample := rs.sn[len(rs.sn)-1]
		ms := func(samples int64) float64 { return float64(samples) / float64(simCfg.Rate) * 1000 }
		loss := ms(tr.samplesKill - (lastSample + 1))
		// What the recorder had been given but had not yet written: the
		// loss less what still waited in the queues for the Python stage
		// or the recorder (two blocks in hand are not in the queue depths).
		recorderLoss := ms(tr.samplesKill - (lastSample + 1) - tr.queued - 2*int64(cfg.Pipeline.BlockMS*float64(simCfg.Rate)/1000))
		maxLoss, maxRecorderLoss = max(maxLoss, loss), max(maxRecorderLoss, recorderLoss)
		t.Logf("trial %d: %d samples from %d recovered; lost at most %.0f ms before the kill, of which %.0f ms were still queued before the stage or the recorder",
			i, len(rs.sn), rs.sn[0], loss, ms(tr.queued))
		// The recorder's part is what flush_ms bounds; the queues' part
		// depends on how far a busy machine lets the pipeline fall behind
		// (at most queue_ms).
		if recorderLoss > 1000 {
			t.Errorf("trial %d: %.0f ms of the data the recorder had been given before the kill are missing (flush_ms = %d; the goal is ≤ 1 s)", i, recorderLoss, flushMS)
		}
	}
	view := neoRead(t, sessions...)
	for i, tr := range done {
		segs := view[sessions[i]]
		rs := readStream(t, tr.rec)
		sum := sha256.Sum256(rs.dat)
		// (neo 0.11 names event channels by their last folder: of the
		// two "TTL" folders it shows the source's, "TTL Input".)
		if _, ok := segs[0].Events["TTL Input"]; len(segs) != 1 || segs[0].Size != len(rs.sn) || segs[0].SHA256 != hex.EncodeToString(sum[:]) || !ok {
			t.Errorf("trial %d: neo reads %+v, want %d samples with the file's sha256 and the TTL events", i, segs, len(rs.sn))
		}
	}
	t.Logf("%d kills survived, each recording recovered and read by neo; max data lost per kill %.0f ms, %.0f ms of it past the queues (flush_ms = %d)", len(done), maxLoss, maxRecorderLoss, flushMS)
}

// TestSIGTERMUnderLoadFinalises records 384 channels × 30 kHz through the
// example band-pass filter and threshold stages, then sends SIGTERM: the
// daemon exits 0 and every file is finalised (no marker, nothing for
// recovery to fix), and neo reads the recording.
func TestSIGTERMUnderLoadFinalises(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the daemon")
	}
	bin := buildBinary(t)
	dir := t.TempDir()
	socket := filepath.Join(dir, "control.sock")
	cfgPath := filepath.Join(dir, "ephysd.toml")
	os.WriteFile(cfgPath, []byte(fmt.Sprintf(`
[source]
driver = "sim"
[source.sim]
channels = 384
rate = 30000
[[stage]]
module = %q
[[stage]]
module = %q
[recording]
parent_directory = "recs"
[control]
start_mode = "record"
http = ""
socket = %q
[log]
format = "json"
`, mustAbs(t, "../examples/bandpass_filter.py"), mustAbs(t, "../examples/threshold_ttl.py"), socket)), 0o644)
	d := startDaemon(t, bin, cfgPath, socket)
	st := d.waitStatus(t, "2 s of recording", 90*time.Second, func(st *ControlStatus) bool {
		return st.Recording != nil && st.Recording.Seconds >= 2
	})
	recDir := st.Recording.Path
	if err := d.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := d.wait(t, 60*time.Second); err != nil {
		t.Fatalf("exit after SIGTERM: %v\n%s", err, d.stderr)
	}
	if !strings.Contains(d.stderr.String(), `"reason":"signal"`) {
		t.Errorf("no clean stop logged:\n%s", d.stderr)
	}
	checkConsistent(t, recDir)
	rs := readStream(t, recDir)
	segs := neoRead(t, sessionOf(recDir))[sessionOf(recDir)]
	sum := sha256.Sum256(rs.dat)
	if rs.channels != 384 || len(segs) != 1 || segs[0].Size != len(rs.sn) || segs[0].SHA256 != hex.EncodeToString(sum[:]) {
		t.Fatalf("neo reads %+v; the files hold %d samples of %d channels", segs, len(rs.sn), rs.channels)
	}
	t.Logf("SIGTERM after %.1f s at 384 ch × 30 kHz: exit 0, %d samples finalised (overruns %d), neo reads them", st.Recording.Seconds, len(rs.sn), st.Pipeline.Overruns)
}

// crashingStage segfaults the interpreter (ctypes.string_at(0)) at its
// 300th block, unless the flag file exists; it writes the flag (with the
// sample number of the block) first, so that the restarted daemon runs.
const crashingStage = `
import ctypes, os
FLAG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "crashed")
class PyProcessor:
    def __init__(self, processor, num_channels, sample_rate):
        self.p = processor
        self.n = 0
    def process(self, data):
        self.n += 1
        if self.n % 50 == 1:
            self.p.add_python_event(1, self.n % 100 == 1)
        if self.n == 300 and not os.path.exists(FLAG):
            with open(FLAG, "w") as f:
                f.write(str(self.p.sample_number))
            ctypes.string_at(0)
`

// TestPythonSegfaultRestartRecovers: a stage dereferences NULL in C: the
// daemon dies of it; restarted with the same configuration (as systemd
// would), it recovers the recording of the crashed run at start, and neo
// reads that recording, which holds what the simulator produced up to
// about the crash.
func TestPythonSegfaultRestartRecovers(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the daemon")
	}
	bin := buildBinary(t)
	dir := t.TempDir()
	mod := filepath.Join(dir, "crash.py")
	os.WriteFile(mod, []byte(crashingStage), 0o644)
	cfgPath, socket := crashConfig(t, dir, mod, "record", 100, "")
	cfg, err := LoadConfig(cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	simCfg := *cfg.Driver.(*sim.Config)

	first := startDaemon(t, bin, cfgPath, socket)
	st := first.waitStatus(t, "recording", 60*time.Second, func(st *ControlStatus) bool { return st.Recording != nil })
	crashed := st.Recording.Path
	died := first.wait(t, 60*time.Second)
	var exit *exec.ExitError
	if !errors.As(died, &exit) || exit.Success() {
		t.Fatalf("the daemon did not die of the segfault: %v\n%s", died, first.stderr)
	}
	if !strings.Contains(first.stderr.String(), "SIGSEGV") && !strings.Contains(first.stderr.String(), "Segmentation fault") {
		t.Errorf("no segfault in the daemon's output:\n%s", first.stderr)
	}
	flag, err := os.ReadFile(filepath.Join(dir, "crashed"))
	if err != nil {
		t.Fatal(err)
	}
	var crashSample int64
	fmt.Sscan(string(flag), &crashSample)
	if _, err := os.Stat(filepath.Join(crashed, recording.UnfinishedMarker)); err != nil {
		t.Fatalf("the crashed recording has no marker: %v", err)
	}
	t.Logf("the daemon died (%v) at sample %d", died, crashSample)

	// systemd restarts it with the same configuration.
	second := startDaemon(t, bin, cfgPath, socket)
	st = second.waitStatus(t, "recording after the restart", 60*time.Second, func(st *ControlStatus) bool { return st.Recording != nil })
	if st.Recording.Path == crashed {
		t.Fatalf("the restarted daemon records into the crashed recording %s", crashed)
	}
	log := second.stderr.String()
	if !strings.Contains(log, "recovered a recording that ephysd did not finalise") || !strings.Contains(log, crashed) {
		t.Errorf("the restart did not log the recovery of %s:\n%s", crashed, log)
	}
	checkConsistent(t, crashed)
	second.cmd.Process.Signal(syscall.SIGTERM)
	if err := second.wait(t, 60*time.Second); err != nil {
		t.Fatalf("the restarted daemon: %v\n%s", err, second.stderr)
	}
	rs := readStream(t, crashed)
	checkAgainstSim(t, rs, simCfg)
	last := rs.sn[len(rs.sn)-1]
	if last >= crashSample+30 || crashSample-last > int64(float64(simCfg.Rate)) {
		t.Errorf("the crashed recording ends at sample %d; the crash was at %d", last, crashSample)
	}
	segs := neoRead(t, sessionOf(crashed))[sessionOf(crashed)]
	sum := sha256.Sum256(rs.dat)
	if len(segs) != 1 || segs[0].Size != len(rs.sn) || segs[0].SHA256 != hex.EncodeToString(sum[:]) {
		t.Fatalf("neo reads %+v of the crashed recording; its files hold %d samples", segs, len(rs.sn))
	}
	t.Logf("recovered %d samples up to %d: %.0f ms before the crash lost", len(rs.sn), last, float64(crashSample-last-1)/float64(simCfg.Rate)*1000)
}

// TestRecoverCommand runs `ephysd recover` on a finished recording (exit
// 0, nothing changed), on a recording it cannot fix (exit 1, NOT FIXED
// with why), without a folder (usage, exit 2) and on a missing folder.
func TestRecoverCommand(t *testing.T) {
	parent := t.TempDir()
	c := process(t, fmt.Sprintf(`
[source]
driver = "sim"
[source.sim]
channels = 4
realtime = false
[recording]
parent_directory = %q
`, parent), 200*time.Millisecond)
	session := sessionDir(t, c)
	run := func(args ...string) (int, string, string) {
		var stdout, stderr bytes.Buffer
		code := Main(append([]string{"recover"}, args...), &stdout, &stderr)
		return code, stdout.String(), stderr.String()
	}
	code, out, errOut := run(parent)
	if code != 0 || !strings.Contains(out, "(finalised): consistent, nothing to do") ||
		!strings.Contains(out, "1 recordings checked: 0 not finalised, 0 fixed") || errOut != "" {
		t.Errorf("a finished recording: exit %d\n%s%s", code, out, errOut)
	}
	recs := recordingDirs(t, session)
	os.Remove(filepath.Join(recs[0], "structure.oebin"))
	code, out, errOut = run(session)
	if code != 1 || !strings.Contains(out, "NOT FIXED") || !strings.Contains(out, "channel count of continuous.dat is unknown") ||
		!strings.Contains(errOut, "could not fix "+recs[0]) {
		t.Errorf("a recording without structure.oebin: exit %d\n%s%s", code, out, errOut)
	}
	if code, _, errOut = run(); code != 2 || !strings.Contains(errOut, "give the recording folders") {
		t.Errorf("no folder: exit %d, %s", code, errOut)
	}
	if code, _, errOut = run(filepath.Join(parent, "nope")); code != 1 || !strings.Contains(errOut, "no such file or directory") {
		t.Errorf("a missing folder: exit %d, %s", code, errOut)
	}
}
