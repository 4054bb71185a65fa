package daemon

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/ephysd/ephysd/drivers/openbci"
	"github.com/ephysd/ephysd/drivers/openbci/openbcitest"
	"github.com/ephysd/ephysd/drivers/pulsepal/pulsepaltest"
)

// buildBinary builds cmd/ephysd once per test binary.
var builtBinary string

func buildBinary(t *testing.T) string {
	t.Helper()
	if builtBinary != "" {
		return builtBinary
	}
	dir, err := os.MkdirTemp("", "ephysd-bin")
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "ephysd")
	if out, err := exec.Command("go", "build", "-o", bin, "../cmd/ephysd").CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	builtBinary = bin
	return bin
}

// cytonCounts is the fake board's signal: channel 0 a 7 Hz sine of ±150 µV
// (so threshold_ttl.py's −60 µV is crossed 7 times a second), the others
// the fake's default pattern over the whole int24 range.
func cytonCounts(k, ch int) int32 {
	if ch == 0 {
		return int32(math.Round(150 * math.Sin(2*math.Pi*7*float64(k)/250) / openbci.MicrovoltsPerCount(24)))
	}
	return openbcitest.SampleCounts(k, ch)
}

// cytonMicrovolts is what the driver makes of the fake's sample k, channel
// ch at gain 24.
func cytonMicrovolts(k, ch int) float32 {
	return float32(float64(cytonCounts(k, ch)) * openbci.MicrovoltsPerCount(24))
}

// TestRunCytonThresholdPulsePal is the hardware path end to end with the
// real binary: `ephysd run` reads a fake Cyton on one pseudo-terminal, runs
// examples/threshold_ttl.py, records, and triggers a fake Pulse Pal on
// another. The recording (read with neo) holds the Cyton's samples, the
// script's events sit at the exact crossing samples, and the Pulse Pal got
// one soft trigger of channel 1 (D5 4D 01) per rising edge.
func TestRunCytonThresholdPulsePal(t *testing.T) {
	bin := buildBinary(t)
	cyton := openbcitest.Start(t, openbcitest.Options{Counts: cytonCounts})
	pp := pulsepaltest.Start(t, pulsepaltest.Options{})
	dir := t.TempDir()
	cfgPath := filepath.Join(dir, "ephysd.toml")
	os.WriteFile(cfgPath, []byte(fmt.Sprintf(`
[source]
driver = "openbci"
[source.openbci]
path = %q
accelerometer = false

[[stage]]
module = %q

[[output]]
driver = "pulsepal"
[output.pulsepal]
path = %q
[[output.pulsepal.map]]
line = 0
channel = 1
mode = "trigger"

[recording]
parent_directory = "recs"
[control]
start_mode = "record"
http = ""
`, cyton.Path(), mustAbs(t, "../examples/threshold_ttl.py"), pp.Path)), 0o644)
	cmd := exec.Command(bin, "run", "--config", cfgPath, "--duration", "2s")
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("ephysd run: %v\n%s\n%s", err, stderr.String(), stdout.String())
	}
	if got := string(cyton.Received()); !strings.HasPrefix(got, "vd") || !strings.Contains(got, "b") || !strings.HasSuffix(got, "s") {
		t.Fatalf("the board received %q: want the start-up sequence v d x…X b, then s", got)
	}
	sessions, _ := filepath.Glob(filepath.Join(dir, "recs", "*"))
	if len(sessions) != 1 {
		t.Fatalf("sessions %v\n%s", sessions, stderr.String())
	}
	rec, _ := filepath.Glob(filepath.Join(sessions[0], "Record Node *", "experiment1", "recording1"))
	cont := filepath.Join(rec[0], "continuous", "OpenBCI_Cyton-100.cyton")

	// Samples: every recorded value is round(µV / bit_volts) of the fake's.
	sn := readNpyInt64(t, filepath.Join(cont, "sample_numbers.npy"))
	dat, err := os.ReadFile(filepath.Join(cont, "continuous.dat"))
	if err != nil || len(sn) < 300 || len(dat) != len(sn)*8*2 {
		t.Fatalf("%d samples, %d bytes of continuous.dat (%v)", len(sn), len(dat), err)
	}
	bitVolts := openbci.MicrovoltsPerCount(24) * openbci.BitVoltsCounts
	for i, k := range sn {
		for ch := 0; ch < 8; ch++ {
			want := math.RoundToEven(math.Max(-32768, math.Min(32767, float64(cytonMicrovolts(int(k), ch))/bitVolts)))
			got := int16(binary.LittleEndian.Uint16(dat[2*(i*8+ch):]))
			if float64(got) != want {
				t.Fatalf("sample %d ch %d: recorded %d, want %v", k, ch, got, want)
			}
		}
	}
	// Events: threshold_ttl (-60 µV downwards on channel 0, 1-sample pulse
	// at 250 Hz) rises at each crossing sample and falls one sample later.
	var wantRise []int64
	for i := 1; i < len(sn); i++ {
		k := sn[i]
		if sn[i-1] == k-1 && cytonMicrovolts(int(k-1), 0) > -60 && cytonMicrovolts(int(k), 0) <= -60 {
			wantRise = append(wantRise, k)
		}
	}
	py := filepath.Join(rec[0], "events", "Python_Processor-101.cyton", "TTL")
	if _, err := os.Stat(py); err != nil {
		t.Fatalf("no Python events (%d crossings expected): %v\n%s\n%s", len(wantRise), err, stderr.String(), stdout.String())
	}
	gotSN := readNpyInt64(t, filepath.Join(py, "sample_numbers.npy"))
	states := readNpyInt16(t, filepath.Join(py, "states.npy"))
	var gotRise []int64
	for i, st := range states {
		if st == 1 {
			gotRise = append(gotRise, gotSN[i])
		} else if st != -1 || (i > 0 && gotSN[i] != gotSN[i-1]+1) {
			t.Fatalf("event %d: state %d at %d", i, st, gotSN[i])
		}
	}
	if len(wantRise) < 10 || fmt.Sprint(gotRise) != fmt.Sprint(wantRise) {
		t.Fatalf("rising edges\n got %v\nwant %v", gotRise, wantRise)
	}
	// The Pulse Pal: one trigger of channel 1 per rising edge.
	deadline := time.Now().Add(2 * time.Second)
	for len(pp.Triggers()) < len(wantRise) && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	tr := pp.Triggers()
	if len(tr) != len(wantRise) {
		t.Fatalf("%d triggers for %d rising edges", len(tr), len(wantRise))
	}
	for _, x := range tr {
		if x.Mask != 0x01 {
			t.Fatalf("trigger mask %#x, want 0x01", x.Mask)
		}
	}
	// neo reads the recording.
	out := pyCheck(t, `
import sys
from neo.rawio.openephysbinaryrawio import OpenEphysBinaryRawIO
r = OpenEphysBinaryRawIO(dirname=sys.argv[1]); r.parse_header()
print(r.get_signal_size(0, 0, 0), r.header["signal_channels"][0]["units"])
`, sessions[0])
	if want := fmt.Sprintf("%d uV", len(sn)); strings.TrimSpace(out) != want {
		t.Fatalf("neo: %q, want %q", out, want)
	}
	t.Logf("%d samples, %d crossings, %d triggers", len(sn), len(wantRise), len(tr))
}

// An unplugged Cyton is reopened when it returns (here: a new fake behind
// the same /dev/serial/by-id style link), the time away is a gap in the
// sample numbers, and the recording stays consistent.
func TestCytonUnplugIsAGapAndReconnects(t *testing.T) {
	first := openbcitest.Start(t, openbcitest.Options{UnplugAfter: 100})
	link := filepath.Join(t.TempDir(), "usb-OpenBCI-dongle")
	if err := os.Symlink(first.Path(), link); err != nil {
		t.Fatal(err)
	}
	out := t.TempDir()
	cfg, err := ParseConfig(filepath.Join(out, "x.toml"), []byte(fmt.Sprintf(`
[source]
driver = "openbci"
[source.openbci]
path = %q
accelerometer = false
[recording]
parent_directory = %q
`, link, out)))
	if err != nil {
		t.Fatal(err)
	}
	c, err := NewChain(cfg, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	c.StartRecording()
	if err := c.Start(); err != nil {
		t.Fatal(err)
	}
	// Wait for the unplug, stay away a while, then plug a new board in.
	deadline := time.Now().Add(5 * time.Second)
	for c.Device.State().Disconnects == 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(300 * time.Millisecond)
	second := openbcitest.Start(t, openbcitest.Options{})
	os.Remove(link)
	os.Symlink(second.Path(), link)
	deadline = time.Now().Add(10 * time.Second)
	for !c.Device.State().Connected && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(400 * time.Millisecond)
	if err := c.Stop(); err != nil {
		t.Fatal(err)
	}
	st, ds := c.Runner.Stats(), c.Device.State()
	if ds.Disconnects != 1 || !ds.Connected {
		t.Fatalf("device state %+v", ds)
	}
	if st.Gaps != 1 || st.GapSamples < 75 { // ≥ 300 ms away at 250 Hz
		t.Fatalf("stats %+v: want one gap of at least 75 samples", st)
	}
	rec, _ := filepath.Glob(filepath.Join(c.Session.Dir(), "Record Node *", "experiment1", "recording1"))
	sn := readNpyInt64(t, filepath.Join(rec[0], "continuous", "OpenBCI_Cyton-100.cyton", "sample_numbers.npy"))
	jumps := 0
	for i := 1; i < len(sn); i++ {
		if sn[i] != sn[i-1]+1 {
			jumps++
			if sn[i] <= sn[i-1] {
				t.Fatalf("sample numbers go back at %d: %d after %d", i, sn[i], sn[i-1])
			}
		}
	}
	// The first board sent samples 0..99 before it was pulled out; the pty
	// drops what was in flight at the unplug, as a USB unplug would.
	run := 0
	for run < len(sn) && sn[run] == int64(run) {
		run++
	}
	if jumps != 1 || run < 95 || run > 100 || len(sn) <= run {
		t.Fatalf("%d jumps in %d sample numbers; the first board's run is 0..%d", jumps, len(sn), run-1)
	}
}

func readNpy(t *testing.T, path string) []byte {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if len(data) < 10 || string(data[1:6]) != "NUMPY" {
		t.Fatalf("%s: not a .npy file", path)
	}
	hl := int(binary.LittleEndian.Uint16(data[8:10]))
	return data[10+hl:]
}

func readNpyInt64(t *testing.T, path string) []int64 {
	b := readNpy(t, path)
	out := make([]int64, len(b)/8)
	for i := range out {
		out[i] = int64(binary.LittleEndian.Uint64(b[8*i:]))
	}
	return out
}

func readNpyInt16(t *testing.T, path string) []int16 {
	b := readNpy(t, path)
	out := make([]int16, len(b)/2)
	for i := range out {
		out[i] = int16(binary.LittleEndian.Uint16(b[2*i:]))
	}
	return out
}
