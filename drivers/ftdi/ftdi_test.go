package ftdi

import (
	"bytes"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/ephysd/ephysd/drivers"
	"github.com/ephysd/ephysd/drivers/ftdi/ftditest"
	"github.com/ephysd/ephysd/drivers/usb"
	"github.com/ephysd/ephysd/pipeline"
)

const pyID = 10

var procs = drivers.Processors{SourceID: 1, Python: map[string]int{"py": pyID}}

func ttl(proc int, line uint8, state bool, sample int64) pipeline.Event {
	return pipeline.Event{Kind: pipeline.EventTTL, Processor: proc, Line: line, State: state, SampleNumber: sample}
}

func testConfig() Config {
	c := DefaultConfig()
	c.SerialNumber = "FT5X9ABC"
	c.Map = []drivers.Mapping{
		{Line: 0, Channel: 0},                               // level
		{Line: 1, Channel: 2, Invert: true},                 // level, inverted
		{Line: 2, Channel: 7, Mode: "trigger", PulseMS: 5},  // 5 ms pulse
		{From: "input", Line: 3, Channel: 4, Mode: "level"}, // mirrors a source input
	}
	return c
}

func open(t testing.TB) (*Sink, *ftditest.FT232H) {
	t.Helper()
	fake := ftditest.New()
	c := testConfig()
	s, err := c.OpenWith(&ftditest.Opener{Dev: fake, Serial: "FT5X9ABC"}, procs)
	if err != nil {
		t.Fatalf("open: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	return s, fake
}

func TestOpenSequence(t *testing.T) {
	_, fake := open(t)
	want := []string{
		"0x40 req 0x00 value 0x0000 index 1", // reset
		"0x40 req 0x09 value 0x0001 index 1", // latency timer 1 ms
		"0x40 req 0x0b value 0x0195 index 1", // async bitbang, pins 0, 2, 4, 7 out
	}
	var got []string
	for _, r := range fake.Requests() {
		got = append(got, r.String())
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("control requests:\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	w := fake.Writes()
	if len(w) != 1 || w[0].Endpoint != 0x02 || !bytes.Equal(w[0].Data, []byte{0x04}) {
		t.Errorf("initial write %+v, want one byte 04 (only the inverted pin 2 high) to 0x02", w)
	}
	if mode, mask := fake.BitMode(); mode != ModeAsyncBitbang || mask != 0x95 {
		t.Errorf("bit mode %#x mask %#x", mode, mask)
	}
}

func TestInterfaceB(t *testing.T) {
	p, err := PortByLetter("b")
	if err != nil || p.Interface != 1 || p.Index != 2 || p.Out != 0x04 || p.In != 0x83 {
		t.Errorf("B = %+v, %v", p, err)
	}
	if _, err := PortByLetter("E"); err == nil {
		t.Errorf("interface E accepted")
	}
}

func TestEventsToBytes(t *testing.T) {
	s, fake := open(t)
	b := &pipeline.Block{Events: []pipeline.Event{
		ttl(pyID, 0, true, 100), // pin 0 high
		ttl(pyID, 1, true, 100), // inverted pin 2 low; same sample: one write 01
		ttl(1, 0, true, 101),    // line 0 of the source: not mapped from input
		ttl(1, 3, true, 102),    // source line 3 → pin 4 high: 11
		ttl(pyID, 0, false, 105),
		ttl(pyID, 1, false, 105), // pins 0 low, 2 high: 14
		ttl(pyID, 0, false, 106), // no change: no write
	}}
	if err := s.HandleEvents(b); err != nil {
		t.Fatal(err)
	}
	b = &pipeline.Block{Events: []pipeline.Event{
		ttl(pyID, 2, true, 200), // trigger: pin 7 high for 5 ms
		ttl(pyID, 2, false, 201),
	}}
	if err := s.HandleEvents(b); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(2 * time.Second)
	for len(fake.Writes()) < 6 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	w := fake.Writes()
	var got [][]byte
	for _, x := range w {
		got = append(got, x.Data)
	}
	want := [][]byte{{0x04}, {0x01}, {0x11}, {0x14}, {0x94}, {0x14}}
	if len(got) != len(want) {
		t.Fatalf("writes % x, want % x", got, want)
	}
	for i := range want {
		if !bytes.Equal(got[i], want[i]) {
			t.Fatalf("writes % x, want % x", got, want)
		}
	}
	width := w[5].At.Sub(w[4].At)
	t.Logf("trigger pulse width %v (pulse_ms 5)", width)
	if width < 5*time.Millisecond || width > 30*time.Millisecond {
		t.Errorf("pulse width %v, want 5 ms (+ timer jitter)", width)
	}
}

func TestRetriggerExtendsPulse(t *testing.T) {
	s, fake := open(t)
	s.HandleEvents(&pipeline.Block{Events: []pipeline.Event{ttl(pyID, 2, true, 1)}})
	time.Sleep(3 * time.Millisecond)
	s.HandleEvents(&pipeline.Block{Events: []pipeline.Event{ttl(pyID, 2, false, 2), ttl(pyID, 2, true, 3)}})
	time.Sleep(20 * time.Millisecond)
	w := fake.Writes()
	if len(w) != 3 || w[1].Data[0] != 0x84 || w[2].Data[0] != 0x04 {
		t.Fatalf("writes %+v, want 04, 84, 04", w)
	}
	if d := w[2].At.Sub(w[1].At); d < 8*time.Millisecond {
		t.Errorf("retriggered pulse lasted %v, want ≥ 8 ms (3 ms + a new 5 ms)", d)
	}
}

func TestUnplug(t *testing.T) {
	s, fake := open(t)
	fake.Unplug()
	err := s.HandleEvents(&pipeline.Block{Events: []pipeline.Event{ttl(pyID, 0, true, 1)}})
	if err == nil || !errors.Is(err, usb.ErrNoDevice) || !strings.Contains(err.Error(), "ftdi 0403:6014 serial FT5X9ABC interface A") || !strings.Contains(err.Error(), "unplugged") {
		t.Fatalf("after unplug: %v", err)
	}
	if err2 := s.HandleEvents(&pipeline.Block{}); err2 == nil {
		t.Errorf("the error is not sticky")
	}
	if err := s.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
	// Reopening a gone device fails with a clear error.
	c := testConfig()
	if _, err := c.OpenWith(&ftditest.Opener{Dev: fake, Serial: "FT5X9ABC"}, procs); !errors.Is(err, usb.ErrNoDevice) {
		t.Errorf("reopen after unplug: %v", err)
	}
}

func TestConfigErrors(t *testing.T) {
	for _, tc := range []struct {
		edit func(*Config)
		want string
	}{
		{func(c *Config) { c.Map[0].Channel = 8 }, "channel 8"},
		{func(c *Config) { c.Interface = "Z" }, "interface"},
		{func(c *Config) { c.Map = nil }, "no [[output.ftdi.map]]"},
	} {
		c := testConfig()
		tc.edit(&c)
		if _, err := c.OpenWith(&ftditest.Opener{Dev: ftditest.New()}, procs); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("got %v, want %q", err, tc.want)
		}
	}
	c := testConfig()
	if _, err := c.OpenWith(nil, procs); err == nil || !strings.Contains(err.Error(), "without USB support") {
		t.Errorf("nil opener: %v", err)
	}
}

func TestInputPins(t *testing.T) {
	fake := ftditest.New()
	fake.SetInputs(0xA5)
	in, err := OpenInput(&ftditest.Opener{Dev: fake}, DefaultInputConfig())
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	if mode, mask := fake.BitMode(); mode != ModeAsyncBitbang || mask != 0 {
		t.Errorf("bit mode %#x mask %#x, want async bitbang, all inputs", mode, mask)
	}
	if err := in.Start(); err != nil {
		t.Fatal(err)
	}
	if w, at := in.Lines(); w != 0xA5 || at.IsZero() {
		t.Errorf("Lines = %#x at %v, want 0xa5", w, at)
	}
	fake.SetInputs(0x3C)
	deadline := time.Now().Add(time.Second)
	for w, _ := in.Lines(); w != 0x3C; w, _ = in.Lines() {
		if time.Now().After(deadline) {
			t.Fatalf("Lines = %#x, want 0x3c", w)
		}
		time.Sleep(time.Millisecond)
	}
	fake.Unplug()
	deadline = time.Now().Add(time.Second)
	for in.Err() == nil && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	if !errors.Is(in.Err(), usb.ErrNoDevice) {
		t.Errorf("after unplug Err = %v", in.Err())
	}
}

func TestInputSyncFullSpeed(t *testing.T) {
	fake := ftditest.New()
	fake.MaxPacket = 64 // 64 samples per batch: 62 in the first packet, 2 in the second
	fake.SetInputs(0x81)
	cfg := DefaultInputConfig()
	cfg.Mode = "sync"
	in, err := OpenInput(&ftditest.Opener{Dev: fake}, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	if err := in.Start(); err != nil {
		t.Fatal(err)
	}
	fake.SetInputs(0x42)
	deadline := time.Now().Add(time.Second)
	for w, _ := in.Lines(); w != 0x42; w, _ = in.Lines() {
		if time.Now().After(deadline) || in.Err() != nil {
			t.Fatalf("Lines = %#x (err %v), want 0x42", w, in.Err())
		}
		time.Sleep(time.Millisecond)
	}
}

func TestStripModemStatus(t *testing.T) {
	fake := ftditest.New()
	fake.MaxPacket = 64
	data := make([]byte, 130) // 62 + 62 + 6: three packets
	for i := range data {
		data[i] = byte(i)
	}
	fake.QueueIn(data)
	raw := make([]byte, 512)
	n, err := fake.Read(0x81, raw, time.Second)
	if err != nil || n != 64+64+8 {
		t.Fatalf("read %d, %v; want 136 bytes", n, err)
	}
	if !bytes.Equal(raw[64:66], []byte{0x31, 0x60}) {
		t.Fatalf("second packet starts % x", raw[64:66])
	}
	got := StripModemStatus(nil, raw[:n], 64)
	if !bytes.Equal(got, data) {
		t.Errorf("stripped % x\nwant % x", got, data)
	}
	// Only status bytes (an idle chip's packet) is no data.
	if got := StripModemStatus(nil, []byte{0x31, 0x60}, 512); len(got) != 0 {
		t.Errorf("status-only packet gave % x", got)
	}
	if _, err := fake.Read(0x81, raw, 5*time.Millisecond); !errors.Is(err, usb.ErrTimeout) {
		t.Errorf("idle read: %v, want ErrTimeout", err)
	}
}

func TestFakeLatencyTimer(t *testing.T) {
	fake := ftditest.New()
	fake.Control(usb.VendorOut, 0x09, 1, 1, nil)
	var b [1]byte
	if n, err := fake.Control(usb.VendorIn, 0x0A, 0, 1, b[:]); n != 1 || err != nil || b[0] != 1 {
		t.Errorf("get latency: %d %v %d", n, err, b[0])
	}
}

// BenchmarkHandleEvents measures one block with four events at four sample
// numbers (four one-byte writes) through the fake chip.
func BenchmarkHandleEvents(b *testing.B) {
	s, fake := open(b)
	fake.SetRecording(false)
	blk := &pipeline.Block{Events: []pipeline.Event{
		ttl(pyID, 0, true, 1), ttl(pyID, 1, true, 1), ttl(pyID, 0, false, 2), ttl(pyID, 1, false, 3),
		{Kind: pipeline.EventMessage, Text: "ignored"},
	}}
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if err := s.HandleEvents(blk); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*4), "ns/event")
}
