package pulsepal

import (
	"strings"
	"testing"
	"time"

	"github.com/ephysd/ephysd/drivers"
	"github.com/ephysd/ephysd/drivers/pulsepal/pulsepaltest"
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
	c.Map = []drivers.Mapping{
		{Line: 0, Channel: 1, Mode: "trigger"},
		{Line: 1, Channel: 3, Mode: "trigger"},
		{Line: 2, Channel: 2, Mode: "level"},
	}
	return c
}

func TestVoltageCode(t *testing.T) {
	for v, want := range map[float64]uint16{5: 0xC000, 0: 0x8000, -10: 0, 10: 0xFFFF} {
		if got := VoltageCode(v); got != want {
			t.Errorf("VoltageCode(%v) = %#04x, want %#04x", v, got, want)
		}
	}
}

func TestTriggersAndLevels(t *testing.T) {
	fake := pulsepaltest.Start(t, pulsepaltest.Options{Firmware: 23})
	c := config(fake.Path)
	s, err := c.OpenSink(procs)
	if err != nil {
		t.Fatal(err)
	}
	if s.Firmware() != 23 {
		t.Errorf("firmware %d", s.Firmware())
	}
	blk := &pipeline.Block{Events: []pipeline.Event{
		ttl(0, true, 10), ttl(1, true, 10), // one message: mask 05
		ttl(0, false, 11), // falling edges send nothing
		ttl(2, true, 12),  // channel 2 to 5 V
		ttl(1, false, 13), ttl(1, true, 14),
		ttl(2, true, 14), // no change: nothing
	}}
	if err := s.HandleEvents(blk); err != nil {
		t.Fatal(err)
	}
	if err := s.HandleEvents(&pipeline.Block{Events: []pipeline.Event{ttl(2, false, 20)}}); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
	msgs := fake.WaitMessages(7, 2*time.Second)
	var got []string
	for _, m := range msgs {
		got = append(got, m.String())
	}
	want := []string{
		"D5 48 ",         // handshake
		"D5 4F 02 00 80", // level channel starts at 0 V
		"D5 4D 05",       // channels 1 and 3 at sample 10
		"D5 4F 02 00 C0", // 5 V at sample 12
		"D5 4D 04",       // channel 3 at sample 14
		"D5 4F 02 00 80", // back to 0 V
		"D5 51 ",         // disconnect
	}
	if strings.Join(got, "|") != strings.Join(want, "|") {
		t.Errorf("messages\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	tr := fake.Triggers()
	if len(tr) != 2 || tr[0].Mask != 5 || tr[1].Mask != 4 || tr[0].At.IsZero() {
		t.Errorf("triggers %+v", tr)
	}
	if v := fake.Voltages(); len(v) != 3 || v[1].Volts < 4.999 || v[1].Volts > 5.001 || v[1].Channel != 2 {
		t.Errorf("voltages %+v", v)
	}
	if !fake.Disconnected() {
		t.Errorf("no disconnect message")
	}
	if j := fake.Junk(); len(j) != 0 {
		t.Errorf("junk bytes % x", j)
	}
}

func TestConfirmations(t *testing.T) {
	fake := pulsepaltest.Start(t, pulsepaltest.Options{})
	c := config(fake.Path)
	s, err := c.OpenSink(procs)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	for i := int64(0); i < 10; i++ {
		s.HandleEvents(&pipeline.Block{Events: []pipeline.Event{ttl(2, i%2 == 0, i)}})
	}
	deadline := time.Now().Add(2 * time.Second)
	for {
		sent, conf, bad := s.Stats()
		if sent == 11 && conf == 11 && bad == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("sent %d confirmed %d mismatches %d, want 11 11 0", sent, conf, bad)
		}
		time.Sleep(time.Millisecond)
	}
}

func TestHandshakeErrors(t *testing.T) {
	HandshakeTimeout = 300 * time.Millisecond
	defer func() { HandshakeTimeout = 2 * time.Second }()
	silent := pulsepaltest.Start(t, pulsepaltest.Options{Silent: true})
	c := config(silent.Path)
	_, err := c.OpenSink(procs)
	if err == nil || !strings.Contains(err.Error(), "pulsepal "+silent.Path+": no handshake reply") || !strings.Contains(err.Error(), "Bpod mode") {
		t.Errorf("silent device: %v", err)
	}
	old := pulsepaltest.Start(t, pulsepaltest.Options{Firmware: 8})
	c = config(old.Path)
	if _, err := c.OpenSink(procs); err == nil || !strings.Contains(err.Error(), "firmware version 8") {
		t.Errorf("old firmware: %v", err)
	}
	c = config("/dev/nonexistent-pulsepal")
	if _, err := c.OpenSink(procs); err == nil || !strings.Contains(err.Error(), "plugged in") {
		t.Errorf("missing device: %v", err)
	}
	c = config(old.Path)
	c.Map[0].Channel = 5
	if _, err := c.OpenSink(procs); err == nil || !strings.Contains(err.Error(), "channel 5") {
		t.Errorf("channel 5: %v", err)
	}
}

func TestUnplug(t *testing.T) {
	fake := pulsepaltest.Start(t, pulsepaltest.Options{})
	c := config(fake.Path)
	s, err := c.OpenSink(procs)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	fake.Unplug()
	deadline := time.Now().Add(2 * time.Second)
	for {
		err = s.HandleEvents(&pipeline.Block{Events: []pipeline.Event{ttl(0, true, 1)}})
		if err != nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(time.Millisecond)
	}
	if err == nil || !strings.Contains(err.Error(), "pulsepal "+fake.Path) || !strings.Contains(err.Error(), "unplugged") {
		t.Errorf("after unplug: %v", err)
	}
}

// BenchmarkHandleEvents: two trigger events at one sample (one 3-byte
// message) and two falling edges per block, through the pty to the fake.
func BenchmarkHandleEvents(b *testing.B) {
	fake := pulsepaltest.Start(b, pulsepaltest.Options{NoRecord: true})
	c := config(fake.Path)
	c.Map = c.Map[:2]
	s, err := c.OpenSink(procs)
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	blk := &pipeline.Block{Events: []pipeline.Event{ttl(0, true, 1), ttl(1, true, 1), ttl(0, false, 2), ttl(1, false, 2)}}
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if err := s.HandleEvents(blk); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*4), "ns/event")
}
