package firmata

import (
	"bytes"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/ephysd/ephysd/drivers"
	"github.com/ephysd/ephysd/drivers/firmata/firmatatest"
	"github.com/ephysd/ephysd/pipeline"
)

const pyID = 10

var procs = drivers.Processors{SourceID: 1, Python: map[string]int{"py": pyID}}

func ttl(line uint8, state bool, sample int64) pipeline.Event {
	return pipeline.Event{Kind: pipeline.EventTTL, Processor: pyID, Line: line, State: state, SampleNumber: sample}
}

func config(path string) Config {
	c := DefaultConfig()
	c.Path = path
	c.ResetWaitMS = 1000
	c.Map = []drivers.Mapping{
		{Line: 0, Channel: 13},
		{Line: 1, Channel: 4, Mode: "trigger", PulseMS: 5},
		{Line: 2, Channel: 9, Invert: true},
	}
	c.ReportInputs = []int{2, 10}
	return c
}

func open(t *testing.T, fake *firmatatest.FakeArduino, c Config) *Board {
	t.Helper()
	b, err := c.OpenBoard(&procs)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	return b
}

func writes(f *firmatatest.FakeArduino) string {
	var s []string
	for _, w := range f.PortWrites() {
		s = append(s, fmt.Sprintf("%d:%02x", w.Port, w.Value))
	}
	return strings.Join(s, " ")
}

func waitWrites(f *firmatatest.FakeArduino, n int) {
	deadline := time.Now().Add(2 * time.Second)
	for len(f.PortWrites()) < n && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
}

func TestVersionWaitAndPinModes(t *testing.T) {
	fake := firmatatest.Start(t, firmatatest.Options{ResetDelay: 300 * time.Millisecond})
	start := time.Now()
	b := open(t, fake, config(fake.Path))
	if d := time.Since(start); d < 300*time.Millisecond {
		t.Errorf("open took %v: did not wait for the version report", d)
	}
	if b.Major != 2 || b.Minor != 5 || fake.Queries() != 0 {
		t.Errorf("version %d.%d, queries %d; want 2.5 from the reset report", b.Major, b.Minor, fake.Queries())
	}
	waitWrites(fake, 2)
	modes := fake.PinModes()
	want := map[int]byte{13: 1, 4: 1, 9: 1, 2: 0, 10: 0}
	if fmt.Sprint(modes) != fmt.Sprint(want) {
		t.Errorf("pin modes %v, want %v", modes, want)
	}
	if !fake.Reporting(0) || !fake.Reporting(1) || fake.Reporting(2) {
		t.Errorf("reporting ports 0,1,2: %v %v %v", fake.Reporting(0), fake.Reporting(1), fake.Reporting(2))
	}
	// Initial levels: port 0 all low, port 1 the inverted pin 9 high.
	if got := writes(fake); got != "0:00 1:02" {
		t.Errorf("initial port writes %q", got)
	}
}

func TestEventsToPortBytes(t *testing.T) {
	fake := firmatatest.Start(t, firmatatest.Options{})
	b := open(t, fake, config(fake.Path))
	waitWrites(fake, 2)
	before := len(fake.Raw())
	err := b.HandleEvents(&pipeline.Block{Events: []pipeline.Event{
		ttl(0, true, 1),                   // pin 13 high, pin 9 still high: 91 22 00
		ttl(2, true, 2),                   // pin 9 (inverted) low: 91 20 00
		ttl(0, false, 3), ttl(0, true, 3), // same sample, back to the same level: nothing
		ttl(1, true, 4), // pin 4 pulse: 90 10 00, then 90 00 00 5 ms later
	}})
	if err != nil {
		t.Fatal(err)
	}
	waitWrites(fake, 6)
	raw := fake.Raw()[before:]
	want := []byte{0x91, 0x22, 0x00, 0x91, 0x20, 0x00, 0x90, 0x10, 0x00, 0x90, 0x00, 0x00}
	if !bytes.Equal(raw, want) {
		t.Errorf("bytes % x\nwant  % x", raw, want)
	}
	// The width as the fake saw it: its reads are scheduled late on a busy
	// machine (both edges may even come in one read), so it is reported,
	// not asserted.
	w := fake.PortWrites()
	t.Logf("pulse width %v as the fake saw it (pulse_ms 5)", w[5].At.Sub(w[4].At))
}

func TestPin13High(t *testing.T) {
	fake := firmatatest.Start(t, firmatatest.Options{})
	c := config(fake.Path)
	c.Map, c.ReportInputs = c.Map[:1], nil
	b := open(t, fake, c)
	waitWrites(fake, 1)
	before := len(fake.Raw())
	b.HandleEvents(&pipeline.Block{Events: []pipeline.Event{ttl(0, true, 1)}})
	waitWrites(fake, 2)
	if raw := fake.Raw()[before:]; !bytes.Equal(raw, []byte{0x91, 0x20, 0x00}) {
		t.Errorf("pin 13 high: % x, want 91 20 00", raw)
	}
}

func TestVersionQuery(t *testing.T) {
	fake := firmatatest.Start(t, firmatatest.Options{NoReportOnReset: true})
	c := config(fake.Path)
	c.ResetWaitMS = 100
	b := open(t, fake, c)
	if fake.Queries() != 1 || b.Major != 2 {
		t.Errorf("queries %d, version %d.%d", fake.Queries(), b.Major, b.Minor)
	}
	silent := firmatatest.Start(t, firmatatest.Options{Silent: true})
	c = config(silent.Path)
	c.ResetWaitMS = 100
	_, err := c.OpenBoard(&procs)
	if err == nil || !strings.Contains(err.Error(), "firmata "+silent.Path+": no Firmata version report") || !strings.Contains(err.Error(), "StandardFirmata") {
		t.Errorf("silent board: %v", err)
	}
}

func TestInputReports(t *testing.T) {
	fake := firmatatest.Start(t, firmatatest.Options{})
	b := open(t, fake, config(fake.Path))
	waitLines := func(want uint64) {
		t.Helper()
		deadline := time.Now().Add(2 * time.Second)
		for w, _ := b.Lines(); w != want; w, _ = b.Lines() {
			if time.Now().After(deadline) {
				t.Fatalf("Lines = %#x, want %#x", w, want)
			}
			time.Sleep(time.Millisecond)
		}
	}
	deadline := time.Now().Add(2 * time.Second)
	for !(fake.Reporting(0) && fake.Reporting(1)) && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	fake.SetInput(2, true)
	waitLines(1 << 2)
	fake.SetInput(3, true) // same port, not reported: masked out
	fake.SetInput(10, true)
	waitLines(1<<2 | 1<<10)
	fake.SetInput(2, false)
	waitLines(1 << 10)
}

func TestUnplug(t *testing.T) {
	fake := firmatatest.Start(t, firmatatest.Options{})
	b := open(t, fake, config(fake.Path))
	fake.Unplug()
	var err error
	deadline := time.Now().Add(2 * time.Second)
	for i := int64(0); err == nil && time.Now().Before(deadline); i++ {
		err = b.HandleEvents(&pipeline.Block{Events: []pipeline.Event{ttl(0, i%2 == 0, i)}})
		time.Sleep(time.Millisecond)
	}
	if err == nil || !strings.Contains(err.Error(), "firmata "+fake.Path) || !strings.Contains(err.Error(), "unplugged") {
		t.Errorf("after unplug: %v", err)
	}
}

func TestConfigErrors(t *testing.T) {
	c := config("/dev/x")
	c.Map[0].Channel = 1
	if _, err := c.Open(procs); err == nil || !strings.Contains(err.Error(), "channel 1") {
		t.Errorf("pin 1: %v", err)
	}
	c = config("/dev/x")
	c.ReportInputs = []int{13}
	if _, err := c.Open(procs); err == nil || !strings.Contains(err.Error(), "both") {
		t.Errorf("pin 13 in and out: %v", err)
	}
}

// BenchmarkHandleEvents: pin 13 toggled twice per block (two 3-byte
// messages in one write) through the pty to the fake.
func BenchmarkHandleEvents(b *testing.B) {
	fake := firmatatest.Start(b, firmatatest.Options{NoRecord: true})
	c := config(fake.Path)
	c.ReportInputs = nil
	board, err := c.OpenBoard(&procs)
	if err != nil {
		b.Fatal(err)
	}
	defer board.Close()
	blk := &pipeline.Block{Events: []pipeline.Event{ttl(0, true, 1), ttl(2, true, 1), ttl(0, false, 2), ttl(2, false, 2)}}
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if err := board.HandleEvents(blk); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*4), "ns/event")
}
