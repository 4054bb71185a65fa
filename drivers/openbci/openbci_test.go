package openbci

import (
	"errors"
	"fmt"
	"io"
	"math"
	"strings"
	"testing"
	"time"

	"github.com/ephysd/ephysd/drivers"
	"github.com/ephysd/ephysd/drivers/openbci/openbcitest"
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
	c.TimeoutMS = 2000
	if mod != nil {
		mod(&c)
	}
	return c
}

// open opens and starts a source on the fake.
func open(t testing.TB, fake *openbcitest.FakeCyton, mod func(*Config)) *Source {
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

// read reads until it has n samples, with blocks of capacity blockCap, and
// returns them with the FirstSample of every block.
func read(t testing.TB, s *Source, blockCap, n int) ([]sample, []int64) {
	t.Helper()
	b := newBlock(t, len(s.Info().Channels), blockCap)
	var out []sample
	var firsts []int64
	deadline := time.Now().Add(10 * time.Second)
	for len(out) < n {
		if time.Now().After(deadline) {
			t.Fatalf("only %d of %d samples within 10 s", len(out), n)
		}
		b.Reset()
		if err := s.ReadBlock(b); err != nil {
			t.Fatalf("ReadBlock after %d samples: %v", len(out), err)
		}
		if b.Samples < 1 || b.Samples > blockCap {
			t.Fatalf("block of %d samples (cap %d)", b.Samples, blockCap)
		}
		firsts = append(firsts, b.FirstSample)
		for i := 0; i < b.Samples; i++ {
			v := make([]float32, b.Channels)
			for c := range v {
				v[c] = b.Data[c*b.Samples+i]
			}
			out = append(out, sample{sn: b.FirstSample + int64(i), vals: v, dig: b.Digital[i]})
		}
	}
	return out[:n], firsts
}

func uv(count int32, gain int) float32 {
	return float32(float64(count) * 4.5 / float64(gain) / (1<<23 - 1) * 1e6)
}

// check compares sample j of the fake's stream with what the source gave.
func check(t testing.TB, got sample, j int, gains []int, accel bool) {
	t.Helper()
	if got.sn != int64(j) {
		t.Fatalf("sample number %d, want %d", got.sn, j)
	}
	for c, g := range gains {
		if want := uv(openbcitest.SampleCounts(j, c), g); got.vals[c] != want {
			t.Fatalf("sample %d CH%d = %v µV, want %v (count %d, gain %d)", j, c+1, got.vals[c], want, openbcitest.SampleCounts(j, c), g)
		}
	}
	if accel {
		a := openbcitest.HeldAccel(j)
		for i := 0; i < 3; i++ {
			if want := float32(float64(a[i]) * 0.002 / 16); got.vals[len(gains)+i] != want {
				t.Fatalf("sample %d accel %d = %v g, want %v", j, i, got.vals[len(gains)+i], want)
			}
		}
	}
	if got.dig != 0 {
		t.Fatalf("sample %d digital word %x, the Cyton has no TTL inputs", j, got.dig)
	}
}

func TestRegisteredAndDefaults(t *testing.T) {
	c, err := drivers.NewSourceConfig("openbci")
	if err != nil {
		t.Fatal(err)
	}
	cfg := c.(*Config)
	if cfg.Baud != 115200 || cfg.Daisy || !cfg.Accelerometer || cfg.TimeoutMS != 5000 || cfg.Path != "" || len(cfg.Gain) != 0 {
		t.Fatalf("defaults %+v", cfg)
	}
}

func TestValidateNamesTheKey(t *testing.T) {
	for _, tc := range []struct {
		mod  func(*Config)
		want string
	}{
		{func(c *Config) { c.Path = "" }, "path is missing"},
		{func(c *Config) { c.Baud = 0 }, "baud = 0"},
		{func(c *Config) { c.Gain = []int{24, 24} }, "gain lists 2 values but the board has 8 channels"},
		{func(c *Config) { c.Daisy = true; c.Gain = make([]int, 8) }, "has 16 channels"},
		{func(c *Config) { c.Gain = []int{24, 24, 3, 24, 24, 24, 24, 24} }, "gain[2] = 3 (CH3)"},
		{func(c *Config) { c.TimeoutMS = 10 }, "timeout_ms = 10"},
	} {
		c := config("/dev/ttyUSB0", tc.mod)
		if err := c.Validate(); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("want error with %q, got %v", tc.want, err)
		}
	}
	c := config("/dev/ttyUSB0", func(c *Config) { c.Gain = []int{1, 2, 4, 6, 8, 12, 24, 24} })
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
}

func TestInfo(t *testing.T) {
	fake := openbcitest.Start(t, openbcitest.Options{Daisy: true, Packets: 1})
	cfg := config(fake.Path(), func(c *Config) { c.Daisy = true })
	src, err := cfg.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	info := src.Info()
	if info.ProcessorName != "OpenBCI Cyton Daisy" || info.ProcessorID != 100 || info.StreamName != "cyton" ||
		info.SampleRate != 125 || info.TTLLines != 0 || len(info.Channels) != 19 {
		t.Fatalf("info %+v", info)
	}
	for i, ch := range info.Channels[:16] {
		if ch.Name != fmt.Sprintf("CH%d", i+1) || ch.Units != "uV" || math.Abs(ch.BitVolts-0.3576)/0.3576 > 1e-3 {
			t.Fatalf("channel %d: %+v", i, ch)
		}
	}
	if ch := info.Channels[16]; ch.Name != "AX" || ch.Units != "g" || ch.BitVolts != 0.000125 {
		t.Fatalf("aux %+v", ch)
	}
	// typical EEG (±500 µV) plus offsets fits the int16 range of the recording
	if r := 32767 * info.Channels[0].BitVolts; r < 10000 {
		t.Fatalf("int16 range ±%v µV", r)
	}
}

func TestHandshakeAndSamplesExact(t *testing.T) {
	fake := openbcitest.Start(t, openbcitest.Options{Rate: 4000, NoiseBeforeBanner: []byte{0xA0, 0x01, 0xC0, 'x', '$', '$'}})
	gains := []int{1, 2, 4, 6, 8, 12, 24, 24}
	s := open(t, fake, func(c *Config) { c.Gain = gains })
	want := "vd" + "x1000110X" + "x2010110X" + "x3020110X" + "x4030110X" + "x5040110X" + "x6050110X" + "x7060110X" + "x8060110X" + "b"
	fake.WaitReceived(t, "b", 2*time.Second)
	if got := string(fake.Received()); got != want {
		t.Fatalf("handshake bytes %q, want %q", got, want)
	}
	got, firsts := read(t, s, 7, 600)
	for j, g := range got {
		check(t, g, j, gains, true)
	}
	for i := 1; i < len(firsts); i++ {
		if firsts[i] <= firsts[i-1] {
			t.Fatalf("blocks out of order: %v", firsts)
		}
	}
	st := s.Stats()
	if st.LostSamples != 0 || st.DiscardedBytes != 0 || st.Gaps != 0 {
		t.Fatalf("stats %+v", st)
	}
	if err := s.Stop(); err != nil {
		t.Fatal(err)
	}
	fake.WaitReceived(t, "s", 2*time.Second)
	b := newBlock(t, 11, 1)
	if err := s.ReadBlock(b); err != io.EOF {
		t.Fatalf("ReadBlock after Stop: %v", err)
	}
}

func TestDefaultBlockOfOneSample(t *testing.T) {
	fake := openbcitest.Start(t, openbcitest.Options{Rate: 2000})
	s := open(t, fake, func(c *Config) { c.Accelerometer = false })
	got, _ := read(t, s, 1, 100)
	for j, g := range got {
		check(t, g, j, []int{24, 24, 24, 24, 24, 24, 24, 24}, false)
	}
}

func TestDaisyPairs(t *testing.T) {
	fake := openbcitest.Start(t, openbcitest.Options{Daisy: true, Rate: 4000})
	s := open(t, fake, func(c *Config) { c.Daisy = true })
	fake.WaitReceived(t, "b", 2*time.Second)
	var wantCmd string
	for _, ch := range "12345678QWERTYUI" {
		wantCmd += "x" + string(ch) + "060110X"
	}
	if got := string(fake.Received()); got != "vd"+wantCmd+"b" {
		t.Fatalf("handshake %q", got)
	}
	gains := make([]int, 16)
	for i := range gains {
		gains[i] = 24
	}
	got, _ := read(t, s, 16, 300)
	for j, g := range got {
		check(t, g, j, gains, true)
	}
}

func TestDaisyHalfPairs(t *testing.T) {
	// Packet 5 is the 9–16 half of sample 2; packet 8 the 1–8 half of
	// sample 4: both samples are lost, the lone halves are dropped.
	fake := openbcitest.Start(t, openbcitest.Options{Daisy: true, Rate: 4000, Drop: []int{5, 8}, Packets: 40})
	s := open(t, fake, func(c *Config) { c.Daisy = true })
	got, firsts := read(t, s, 4, 18)
	wantSN := []int{0, 1, 3, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19}
	gains := make([]int, 16)
	for i := range gains {
		gains[i] = 24
	}
	for i, g := range got {
		check(t, g, wantSN[i], gains, true)
	}
	// How many samples a block holds depends on what had arrived; but a
	// block never spans a gap, so one starts right after each.
	if firsts[0] != 0 || !contains(firsts, 3) || !contains(firsts, 5) {
		t.Fatalf("block starts %v: a block must end at each gap", firsts)
	}
	st := s.Stats()
	if st.LostSamples != 2 || st.HalfPairs != 2 || st.LostPackets != 2 || st.Gaps != 2 {
		t.Fatalf("stats %+v", st)
	}
}

func TestLostPacketsAreGaps(t *testing.T) {
	// 3 lost at 10, 1 at 50, 300 at 100 (the counter wraps past 255 in
	// between and sees 300 mod 256 = 44 of them: the limit of an 8-bit counter).
	drop := []int{10, 11, 12, 50}
	for k := 100; k < 400; k++ {
		drop = append(drop, k)
	}
	fake := openbcitest.Start(t, openbcitest.Options{Rate: 10000, Drop: drop, Packets: 500})
	s := open(t, fake, nil)
	got, firsts := read(t, s, 16, 500-len(drop))
	gains := []int{24, 24, 24, 24, 24, 24, 24, 24}
	j := 0
	var held [3]int16
	for _, g := range got {
		for fakeDropped(drop, j) {
			j++
		}
		sn := j
		if j >= 400 {
			sn = j - 256 // the 8-bit counter cannot see a whole lap
		}
		g.sn += int64(j - sn)
		check(t, g, j, gains, false)
		if a := openbcitest.SampleAccel(j); a != [3]int16{} {
			held = a // the last reading that arrived is held
		}
		for i := 0; i < 3; i++ {
			if want := float32(float64(held[i]) * 0.002 / 16); g.vals[8+i] != want {
				t.Fatalf("sample %d accel %d = %v g, want %v", j, i, g.vals[8+i], want)
			}
		}
		j++
	}
	for _, f := range []int64{13, 51, 144} {
		if !contains(firsts, f) {
			t.Fatalf("no block starts at %d after a gap: %v", f, firsts)
		}
	}
	st := s.Stats()
	if st.LostPackets != 4+44 || st.LostSamples != 4+44 || st.Gaps != 3 {
		t.Fatalf("stats %+v", st)
	}
}

func fakeDropped(drop []int, k int) bool {
	for _, d := range drop {
		if d == k {
			return true
		}
	}
	return false
}

func contains(xs []int64, x int64) bool {
	for _, v := range xs {
		if v == x {
			return true
		}
	}
	return false
}

func TestResyncAfterGarbage(t *testing.T) {
	// Garbage right where a packet is due, starting with A0 and with a
	// valid-looking stop byte 32 bytes after it: the candidate's stop byte
	// falls on a C0–C6 byte inside the real packet that follows.
	garbage := map[int][]byte{}
	for _, k := range []int{5, 40, 77} {
		real := openbcitest.AppendPacket(nil, k, false, 0)
		i := 31
		for i > 1 && (real[i] < 0xC0 || real[i] > 0xC6) {
			i--
		}
		g := make([]byte, 32-i)
		g[0] = 0xA0
		for n := 1; n < len(g); n++ {
			g[n] = []byte{0xA0, 0xC0, 0x00, 0xC3, 0x55}[n%5]
		}
		garbage[k] = g
	}
	garbage[120] = []byte{0x00, 0xC0, 0xA0, 0xC6, 0xA0} // short, not at a packet start
	garbage[121] = []byte("zz\xa0")
	fake := openbcitest.Start(t, openbcitest.Options{Rate: 5000, Garbage: garbage, Packets: 200})
	s := open(t, fake, nil)
	got, _ := read(t, s, 8, 200)
	gains := []int{24, 24, 24, 24, 24, 24, 24, 24}
	for j, g := range got {
		check(t, g, j, gains, true)
	}
	st := s.Stats()
	var total uint64
	for _, g := range garbage {
		total += uint64(len(g))
	}
	if st.DiscardedBytes != total || st.LostSamples != 0 {
		t.Fatalf("discarded %d bytes (garbage %d), stats %+v", st.DiscardedBytes, total, st)
	}
}

func TestNoReply(t *testing.T) {
	fake := openbcitest.Start(t, openbcitest.Options{Silent: true})
	cfg := config(fake.Path(), func(c *Config) { c.TimeoutMS = 300 })
	src, err := cfg.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	err = src.Start()
	want := "openbci " + fake.Path() + ": no reply to soft reset (v) within 0.3 s — is the board switched on (PC position) and the dongle's switch on GPIO6?"
	if err == nil || err.Error() != want {
		t.Fatalf("got  %v\nwant %s", err, want)
	}
}

func TestBoardOff(t *testing.T) {
	for _, opt := range []openbcitest.Options{{BoardOff: true}, {DefaultsFailure: true}} {
		fake := openbcitest.Start(t, opt)
		cfg := config(fake.Path(), nil)
		src, err := cfg.Open()
		if err != nil {
			t.Fatal(err)
		}
		err = src.Start()
		if err == nil || !strings.Contains(err.Error(), "Failure: Communications timeout") ||
			!strings.Contains(err.Error(), "the board is off or not paired") {
			t.Fatalf("%+v: %v", opt, err)
		}
		src.Close()
	}
}

func TestDaisyMismatch(t *testing.T) {
	fake := openbcitest.Start(t, openbcitest.Options{Daisy: true})
	cfg := config(fake.Path(), nil)
	src, err := cfg.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	if err := src.Start(); err == nil || !strings.Contains(err.Error(), "set daisy = true") {
		t.Fatal(err)
	}
}

func TestLegacyFirmwareWithoutChannelReplies(t *testing.T) {
	fake := openbcitest.Start(t, openbcitest.Options{LegacyFirmware: true, Rate: 2000})
	s := open(t, fake, func(c *Config) { c.TimeoutMS = 300 })
	got, _ := read(t, s, 4, 20)
	for j, g := range got {
		check(t, g, j, []int{24, 24, 24, 24, 24, 24, 24, 24}, true)
	}
	if n := len(fake.Commands()); n != 11 {
		t.Fatalf("commands %q", fake.Commands())
	}
}

func TestUnplugMidStream(t *testing.T) {
	fake := openbcitest.Start(t, openbcitest.Options{Rate: 2000, UnplugAfter: 50})
	s := open(t, fake, nil)
	b := newBlock(t, 11, 4)
	n := 0
	var err error
	for err == nil {
		b.Reset()
		if err = s.ReadBlock(b); err == nil {
			n += b.Samples
		}
	}
	want := "openbci " + fake.Path() + ": device disconnected: "
	if !strings.HasPrefix(err.Error(), want) || errors.Is(err, io.EOF) {
		t.Fatalf("error %q, want prefix %q", err, want)
	}
	// The tty layer drops what was in flight at the hang-up.
	if n < 1 || n > 50 {
		t.Fatalf("%d samples before the unplug, want up to the 50 that were sent", n)
	}
}

func TestStopUnblocksReadBlock(t *testing.T) {
	fake := openbcitest.Start(t, openbcitest.Options{Packets: 2})
	s := open(t, fake, nil)
	b := newBlock(t, 11, 1)
	for i := 0; i < 2; i++ { // the two packets the board sends
		if err := s.ReadBlock(b); err != nil {
			t.Fatal(err)
		}
	}
	done := make(chan error)
	go func() { done <- s.ReadBlock(b) }()
	time.Sleep(50 * time.Millisecond)
	start := time.Now()
	s.Stop()
	select {
	case err := <-done:
		if err != io.EOF {
			t.Fatalf("ReadBlock after Stop: %v", err)
		}
		if d := time.Since(start); d > 100*time.Millisecond {
			t.Fatalf("Stop took %v to unblock ReadBlock", d)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("ReadBlock still blocked 2 s after Stop")
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
}

func TestOpenMissingDevice(t *testing.T) {
	cfg := config("/dev/ttyNOPE7", nil)
	if _, err := cfg.Open(); err == nil || !strings.Contains(err.Error(), "openbci: serial /dev/ttyNOPE7: no such device") {
		t.Fatal(err)
	}
}
