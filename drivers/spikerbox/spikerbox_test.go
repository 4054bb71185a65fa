package spikerbox

import (
	"io"
	"strings"
	"testing"
	"time"

	"github.com/ephysd/ephysd/drivers"
	"github.com/ephysd/ephysd/drivers/spikerbox/spikerboxtest"
	"github.com/ephysd/ephysd/pipeline"
)

func newBlock(t testing.TB, channels, samples int) *pipeline.Block {
	t.Helper()
	p, err := pipeline.NewPool(1, channels, samples)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close(false) })
	return p.TryGet()
}

func config(path string, mod func(*Config)) Config {
	c := DefaultConfig()
	c.Path = path
	if mod != nil {
		mod(&c)
	}
	return c
}

func open(t testing.TB, fake *spikerboxtest.FakeSpikerBox, mod func(*Config)) *Source {
	t.Helper()
	cfg := config(fake.Path(), mod)
	src, err := cfg.Open()
	if err != nil {
		t.Fatal(err)
	}
	s := src.(*Source)
	t.Cleanup(func() { s.Close() })
	if err := s.Start(); err != nil {
		t.Fatal(err)
	}
	return s
}

type sample struct {
	sn   int64
	vals []float32
	dig  uint64
}

func read(t testing.TB, s *Source, blockCap, n int) []sample {
	t.Helper()
	b := newBlock(t, len(s.Info().Channels), blockCap)
	var out []sample
	deadline := time.Now().Add(10 * time.Second)
	for len(out) < n {
		if time.Now().After(deadline) {
			t.Fatalf("only %d of %d samples within 10 s", len(out), n)
		}
		b.Reset()
		if err := s.ReadBlock(b); err != nil {
			t.Fatalf("ReadBlock after %d samples: %v", len(out), err)
		}
		for i := 0; i < b.Samples; i++ {
			v := make([]float32, b.Channels)
			for c := range v {
				v[c] = b.Data[c*b.Samples+i]
			}
			out = append(out, sample{sn: b.FirstSample + int64(i), vals: v, dig: b.Digital[i]})
		}
	}
	return out[:n]
}

func checkValues(t testing.TB, got []sample, channels int, scale float32) {
	t.Helper()
	for j, g := range got {
		if g.sn != int64(j) {
			t.Fatalf("sample number %d, want %d", g.sn, j)
		}
		for c := 0; c < channels; c++ {
			if want := (float32(spikerboxtest.FrameValue(j, c)) - 512) * scale; g.vals[c] != want {
				t.Fatalf("sample %d CH%d = %v, want %v", j, c+1, g.vals[c], want)
			}
		}
	}
}

func TestRegisteredAndDefaults(t *testing.T) {
	c, err := drivers.NewSourceConfig("spikerbox")
	if err != nil {
		t.Fatal(err)
	}
	cfg := c.(*Config)
	if cfg.Baud != 222222 || cfg.Channels != 2 || cfg.Rate != 10000 || cfg.Bits != 10 || cfg.ScaleUV != 1 || cfg.EventPulseMS != 1 {
		t.Fatalf("defaults %+v", cfg)
	}
}

func TestValidateNamesTheKey(t *testing.T) {
	for _, tc := range []struct {
		mod  func(*Config)
		want string
	}{
		{func(c *Config) { c.Path = "" }, "path is missing"},
		{func(c *Config) { c.Baud = -1 }, "baud = -1"},
		{func(c *Config) { c.Channels = 0 }, "channels = 0"},
		{func(c *Config) { c.Rate = 10 }, "rate = 10"},
		{func(c *Config) { c.Bits = 16 }, "bits = 16"},
		{func(c *Config) { c.ScaleUV = 0 }, "scale_uv = 0"},
		{func(c *Config) { c.EventPulseMS = -1 }, "event_pulse_ms = -1"},
	} {
		c := config("/dev/ttyACM0", tc.mod)
		if err := c.Validate(); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("want error with %q, got %v", tc.want, err)
		}
	}
}

func TestInfo(t *testing.T) {
	fake := spikerboxtest.Start(t, spikerboxtest.Options{})
	cfg := config(fake.Path(), func(c *Config) { c.Channels = 3; c.ScaleUV = 0.25 })
	src, err := cfg.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	info := src.Info()
	if info.ProcessorName != "SpikerBox" || info.ProcessorID != 100 || info.StreamName != "spikerbox" ||
		info.SampleRate != 10000 || info.TTLLines != 10 || len(info.Channels) != 3 ||
		info.Channels[2].Name != "CH3" || info.Channels[2].Units != "uV" || info.Channels[2].BitVolts != 0.25 {
		t.Fatalf("info %+v", info)
	}
}

func TestHandshakeSamplesAndMessageStripping(t *testing.T) {
	fake := spikerboxtest.Start(t, spikerboxtest.Options{Channels: 1, MidFrameMessages: map[int]string{100: "HWT:MUSCLESS;", 101: "BRD:4;"}})
	s := open(t, fake, func(c *Config) { c.Channels = 3; c.ScaleUV = 0.5 })
	fake.WaitReceived(t, "start:;", 2*time.Second)
	if got := string(fake.Received()); got != "?:;b:;c:3;start:;" {
		t.Fatalf("start commands %q", got)
	}
	got := read(t, s, 10, 2000)
	checkValues(t, got, 3, 0.5)
	for j, g := range got {
		if g.dig != 0 {
			t.Fatalf("sample %d digital %x without events", j, g.dig)
		}
	}
	st := s.Stats()
	if st.DiscardedBytes != 0 || st.BrokenFrames != 0 || st.Messages < 4 {
		t.Fatalf("stats %+v", st)
	}
	s.Stop()
	fake.WaitReceived(t, "h:;", 2*time.Second)
	b := newBlock(t, 3, 10)
	if err := s.ReadBlock(b); err != io.EOF {
		t.Fatalf("after Stop: %v", err)
	}
}

func TestEventsBecomeTTLPulses(t *testing.T) {
	// Pulse 1 ms = 10 samples. Line 3 at 50, again at 52 while still high
	// (low for one sample, then a new pulse), line 0 at 300, line 9 at 300,
	// an out-of-range event number at 400.
	fake := spikerboxtest.Start(t, spikerboxtest.Options{Frames: 1000, Events: map[int]int{50: 3, 52: 3, 300: 0, 400: 12}})
	fake.Close() // replaced below: two events at one frame need a custom stream
	fake = spikerboxtest.Start(t, spikerboxtest.Options{Frames: 1000, Events: map[int]int{50: 3, 52: 3, 300: 0, 400: 12},
		Garbage: map[int][]byte{300: spikerboxtest.Message("EVNT:9;")}})
	s := open(t, fake, nil)
	got := read(t, s, 16, 1000)
	checkValues(t, got, 2, 1)
	want := make([]uint64, 1000)
	for i := 50; i < 52; i++ {
		want[i] |= 1 << 3
	}
	for i := 53; i < 63; i++ {
		want[i] |= 1 << 3
	}
	for i := 300; i < 310; i++ {
		want[i] |= 1 | 1<<9
	}
	words := make([]uint64, 1000)
	for j, g := range got {
		words[j] = g.dig
		if g.dig != want[j] {
			t.Fatalf("sample %d: digital %b, want %b", j, g.dig, want[j])
		}
	}
	ev, _ := pipeline.AppendEdges(nil, 100, 0, words, 0)
	type edge struct {
		line  uint8
		state bool
		sn    int64
	}
	wantEdges := []edge{{3, true, 50}, {3, false, 52}, {3, true, 53}, {3, false, 63}, {0, true, 300}, {9, true, 300}, {0, false, 310}, {9, false, 310}}
	if len(ev) != len(wantEdges) {
		t.Fatalf("%d TTL events: %+v", len(ev), ev)
	}
	for i, e := range ev {
		if w := wantEdges[i]; e.Line != w.line || e.State != w.state || e.SampleNumber != w.sn {
			t.Fatalf("event %d: %+v, want %+v", i, e, w)
		}
	}
	if st := s.Stats(); st.Events != 4 || st.UnknownEvents != 1 {
		t.Fatalf("stats %+v", st)
	}
}

func TestResyncAfterGarbage(t *testing.T) {
	garbage := map[int][]byte{
		10: {0x85, 0x01},                   // a frame cut short by the next frame start
		20: {0x03, 0x7F, 0xFF, 0x12},       // no frame start; a lone FF that is no message
		30: {0xFF, 0xFF, 0x01, 0x02},       // most of a message start
		40: {0x9F},                         // a frame start whose value is out of 10-bit range
		50: {0x01, 0x02, 0x03, 0x04, 0x05}, // more than a frame's worth (4 bytes)
	}
	fake := spikerboxtest.Start(t, spikerboxtest.Options{Frames: 600, Garbage: garbage})
	s := open(t, fake, nil)
	got := read(t, s, 10, 600)
	// Every frame arrives whole; each stretch of garbage is taken for the
	// samples it could have held (rounded up): one, two after frame 50.
	shift := int64(0)
	for j, g := range got {
		if _, ok := garbage[j]; ok {
			shift += (int64(len(garbage[j])) + 3) / 4
		}
		if g.sn != int64(j)+shift {
			t.Fatalf("frame %d has sample number %d, want %d", j, g.sn, int64(j)+shift)
		}
		for c := 0; c < 2; c++ {
			if want := float32(spikerboxtest.FrameValue(j, c)) - 512; g.vals[c] != want {
				t.Fatalf("frame %d CH%d = %v, the box sent %v", j, c+1, g.vals[c], want)
			}
		}
	}
	st := s.Stats()
	if st.DiscardedBytes != 2+4+4+1+5 || st.BrokenFrames != 1 || st.Resyncs != 5 || st.Gaps != 5 || st.LostSamples != 6 {
		t.Fatalf("stats %+v", st)
	}
}

func TestUnplugMidStream(t *testing.T) {
	fake := spikerboxtest.Start(t, spikerboxtest.Options{Rate: 5000, UnplugAfter: 200})
	s := open(t, fake, nil)
	b := newBlock(t, 2, 10)
	var err error
	n := 0
	for err == nil {
		b.Reset()
		if err = s.ReadBlock(b); err == nil {
			n += b.Samples
		}
	}
	if want := "spikerbox " + fake.Path() + ": device disconnected: "; !strings.HasPrefix(err.Error(), want) {
		t.Fatalf("error %q, want prefix %q", err, want)
	}
	if n < 1 || n > 200 {
		t.Fatalf("%d samples before the unplug", n)
	}
}

func TestStopUnblocksReadBlock(t *testing.T) {
	fake := spikerboxtest.Start(t, spikerboxtest.Options{Frames: 1})
	s := open(t, fake, nil)
	b := newBlock(t, 2, 10)
	if err := s.ReadBlock(b); err != nil {
		t.Fatal(err)
	}
	done := make(chan error)
	go func() { done <- s.ReadBlock(b) }()
	time.Sleep(50 * time.Millisecond)
	start := time.Now()
	s.Stop()
	select {
	case err := <-done:
		if err != io.EOF || time.Since(start) > 100*time.Millisecond {
			t.Fatalf("ReadBlock after Stop: %v after %v", err, time.Since(start))
		}
	case <-time.After(2 * time.Second):
		t.Fatal("ReadBlock still blocked 2 s after Stop")
	}
}
