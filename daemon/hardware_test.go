package daemon

import (
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/ephysd/ephysd/drivers/ftdi"
	"github.com/ephysd/ephysd/drivers/ftdi/ftditest"
	"github.com/ephysd/ephysd/drivers/pulsepal/pulsepaltest"
)

// runFor runs a chain built from doc for d of wall-clock time, recording.
func runFor(t *testing.T, doc string, d time.Duration, during func(*Chain)) *Chain {
	t.Helper()
	dir := t.TempDir()
	cfg, err := ParseConfig(filepath.Join(dir, "x.toml"), []byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	c, err := NewChain(cfg, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.StartRecording(); err != nil {
		t.Fatal(err)
	}
	if err := c.Start(); err != nil {
		t.Fatal(err)
	}
	if during != nil {
		during(c)
	}
	time.Sleep(d)
	if err := c.Stop(); err != nil {
		t.Fatal(err)
	}
	return c
}

// The pins of an FTDI chip ([[input]]) become lines 8–15 of the source's
// digital word and are recorded as TTL events.
func TestFTDIInputLinesAreMergedAndRecorded(t *testing.T) {
	fake := ftditest.New()
	old := ftdi.USBOpener
	ftdi.USBOpener = &ftditest.Opener{Dev: fake, VID: 0x0403, PID: 0x6014, Serial: "FT1"}
	defer func() { ftdi.USBOpener = old }()
	out := t.TempDir()
	c := runFor(t, fmt.Sprintf(`
[source]
driver = "sim"
[source.sim]
channels = 2
[[input]]
driver = "ftdi"
first_line = 8
[recording]
parent_directory = %q
`, out), 400*time.Millisecond, func(c *Chain) {
		time.Sleep(150 * time.Millisecond)
		fake.SetInputs(0x05) // pins 0 and 2 high
	})
	if c.Info.TTLLines != 16 {
		t.Fatalf("TTL lines %d, want 16", c.Info.TTLLines)
	}
	res := pyCheck(t, `
import sys, glob, numpy as np
rec = glob.glob(sys.argv[1] + "/Record Node */experiment1/recording1")[0]
ev = rec + "/events/Simulated_Headstage-100.sim/TTL/"
st = np.load(ev + "states.npy"); sn = np.load(ev + "sample_numbers.npy")
r8 = sn[st == 9]; r10 = sn[st == 11]
assert len(r8) == 1 and len(r10) == 1 and r8[0] == r10[0], (r8, r10)
assert r8[0] > 3000, r8   # toggled ≥ 150 ms after the start: never before ~4500 samples
assert not (st == 10).any(), "pin 1 stayed low"
print(r8[0])
`, c.Session.Dir())
	t.Logf("FTDI pins rose at sample %s", strings.TrimSpace(res))
}

// A threshold-crossing script drives a Pulse Pal ([[output]]): every rising
// edge of its line reaches the device as a soft trigger of channel 2.
func TestThresholdScriptTriggersPulsePal(t *testing.T) {
	pp := pulsepaltest.Start(t, pulsepaltest.Options{})
	out := t.TempDir()
	c := runFor(t, fmt.Sprintf(`
[source]
driver = "sim"
[source.sim]
channels = 4
spike_channels = [1]
units = 1
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
`, mustAbs(t, "../examples/threshold_ttl.py"), pp.Path, out), 1500*time.Millisecond, nil)
	if st := c.Stages[0].Status(); st.State != "running" {
		t.Fatalf("stage %+v", st)
	}
	res := pyCheck(t, `
import sys, glob, numpy as np
rec = glob.glob(sys.argv[1] + "/Record Node */experiment1/recording1")[0]
st = np.load(rec + "/events/Python_Processor-101.sim/TTL/states.npy")
print((st == 1).sum())
`, c.Session.Dir())
	var rising int
	fmt.Sscan(res, &rising)
	triggers := pp.Triggers()
	if rising == 0 || len(triggers) != rising {
		t.Fatalf("%d rising edges recorded, %d triggers at the Pulse Pal", rising, len(triggers))
	}
	for _, tr := range triggers {
		if tr.Mask != 0x02 {
			t.Fatalf("trigger mask %#x, want channel 2 (0x02)", tr.Mask)
		}
	}
}
