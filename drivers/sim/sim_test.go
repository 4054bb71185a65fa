package sim

import (
	"errors"
	"io"
	"math"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/ephysd/ephysd/drivers"
	"github.com/ephysd/ephysd/pipeline"
)

// newBlock returns one pooled block of channels × samples.
func newBlock(t testing.TB, channels, samples int) *pipeline.Block {
	t.Helper()
	p, err := pipeline.NewPool(1, channels, samples)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close(false) })
	return p.TryGet()
}

func open(t testing.TB, cfg Config) *Source {
	t.Helper()
	src, err := cfg.Open()
	if err != nil {
		t.Fatal(err)
	}
	s := src.(*Source)
	if err := s.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// readAll reads total samples with blocks of blockLen and returns them
// channel-major (channel c at [c*total:(c+1)*total]) with the digital words.
func readAll(t testing.TB, s *Source, blockLen, total int) ([]float32, []uint64) {
	t.Helper()
	nch := s.nch
	b := newBlock(t, nch, blockLen)
	data := make([]float32, nch*total)
	dig := make([]uint64, total)
	for got := 0; got < total; {
		b.Reset()
		if err := s.ReadBlock(b); err != nil {
			t.Fatal(err)
		}
		if b.FirstSample != int64(got) {
			t.Fatalf("block starts at sample %d, want %d", b.FirstSample, got)
		}
		n := min(b.Samples, total-got)
		for c := 0; c < nch; c++ {
			copy(data[c*total+got:c*total+got+n], b.Channel(c)[:n])
		}
		copy(dig[got:got+n], b.Digital[:n])
		got += n
	}
	return data, dig
}

func fast() Config {
	c := DefaultConfig()
	c.Realtime = false
	return c
}

func TestRegistered(t *testing.T) {
	cfg, err := drivers.NewSourceConfig("sim")
	if err != nil {
		t.Fatal(err)
	}
	c, ok := cfg.(*Config)
	if !ok || c.Channels != 32 || c.Rate != 30000 || !c.Realtime || c.Seed != 1 {
		t.Fatalf("registered default config = %#v", cfg)
	}
}

func TestInfo(t *testing.T) {
	s := open(t, fast())
	info := s.Info()
	if info.ProcessorName != "Simulated Headstage" || info.ProcessorID != 100 || info.StreamName != "sim" ||
		info.SampleRate != 30000 || info.TTLLines < 2 || info.TTLChannelName != "TTL Input" || len(info.Channels) != 32 {
		t.Fatalf("info = %+v", info)
	}
	for i, ch := range info.Channels {
		if want := "CH" + itoa(i+1); ch.Name != want || ch.Units != "uV" || ch.BitVolts != 0.195 {
			t.Fatalf("channel %d = %+v", i, ch)
		}
	}
}

func itoa(i int) string {
	if i < 10 {
		return string(rune('0' + i))
	}
	return itoa(i/10) + string(rune('0'+i%10))
}

func TestDeterministicAcrossBlockLengths(t *testing.T) {
	const total = 3*chunkLen + 12345 // crosses chunk and second boundaries
	cfg := fast()
	cfg.Rate = 10000
	a, da := readAll(t, open(t, cfg), 1024, total)
	b, db := readAll(t, open(t, cfg), 777, total)
	rt := cfg
	rt.Realtime = true
	rt.Rate = 100000 // 0.2 s of realtime reading
	cfg.Rate = 100000
	c, dc := readAll(t, open(t, cfg), 500, total)
	d, dd := readAll(t, open(t, rt), 1999, total)
	for i := range a {
		if math.Float32bits(a[i]) != math.Float32bits(b[i]) {
			t.Fatalf("sample %d of channel %d differs between block lengths: %v vs %v", i%total, i/total, a[i], b[i])
		}
		if math.Float32bits(c[i]) != math.Float32bits(d[i]) {
			t.Fatalf("sample %d of channel %d differs between realtime and fast: %v vs %v", i%total, i/total, c[i], d[i])
		}
	}
	for i := range da {
		if da[i] != db[i] || dc[i] != dd[i] {
			t.Fatalf("digital word %d differs", i)
		}
	}
	// Another seed gives other data.
	cfg.Rate = 10000
	cfg.Seed = 2
	e, _ := readAll(t, open(t, cfg), 1024, total)
	same := 0
	for i := range a {
		if a[i] == e[i] {
			same++
		}
	}
	if same > len(a)/100 {
		t.Fatalf("seed 2 repeats %d of %d samples of seed 1", same, len(a))
	}
}

func TestNoiseRMS(t *testing.T) {
	cfg := fast()
	cfg.LFPUV = 0
	cfg.NoiseUV = 7
	s := open(t, cfg)
	// Channel 0 carries no unit: units sit on channels 3, 9, 16, 22, 28 (±2).
	for _, u := range s.units {
		if u.lo <= 0 {
			t.Fatalf("unit on channel %d reaches channel 0", u.peak)
		}
	}
	const total = 60000
	data, _ := readAll(t, s, 1000, total)
	var sum, sum2 float64
	for _, v := range data[:total] {
		sum += float64(v)
		sum2 += float64(v) * float64(v)
	}
	mean := sum / total
	rms := math.Sqrt(sum2/total - mean*mean)
	if rms < 6.5 || rms > 7.5 || math.Abs(mean) > 0.5 {
		t.Fatalf("noise on CH1: rms %.3f µV, mean %.3f µV; want rms ≈ 7, mean ≈ 0", rms, mean)
	}
	// Neighbouring channels are not the same noise.
	var cross float64
	for i := 0; i < total; i++ {
		cross += float64(data[i]) * float64(data[total+i])
	}
	if r := cross / total / (rms * rms); math.Abs(r) > 0.1 {
		t.Fatalf("CH1 and CH2 noise correlate: r = %.3f", r)
	}
}

func TestLFP(t *testing.T) {
	cfg := fast()
	cfg.NoiseUV = 0
	cfg.Units = 0
	cfg.LFPUV = 100
	s := open(t, cfg)
	const total = 30000
	data, _ := readAll(t, s, 1024, total)
	// Theta at 8 Hz dominates: correlate CH1 with 8 Hz and with 20 Hz.
	power := func(ch int, f float64) float64 {
		var re, im float64
		for i := 0; i < total; i++ {
			ph := 2 * math.Pi * f * float64(i) / 30000
			re += float64(data[ch*total+i]) * math.Cos(ph)
			im += float64(data[ch*total+i]) * math.Sin(ph)
		}
		return math.Hypot(re, im) * 2 / total
	}
	if a := power(5, 8); a < 20 || a > 100 {
		t.Fatalf("8 Hz amplitude on CH6 = %.1f µV", a)
	}
	if a, b := power(5, 40), power(5, 20); a < 2 || b > 1 {
		t.Fatalf("40 Hz amplitude %.2f µV (want > 2), 20 Hz %.2f µV (want < 1)", a, b)
	}
	// Correlated across channels, with phase changing along the array.
	var c01, c0last, n0, nl float64
	for i := 0; i < total; i++ {
		x, y, z := float64(data[i]), float64(data[total+i]), float64(data[31*total+i])
		c01 += x * y
		c0last += x * z
		n0 += x * x
		nl += z * z
	}
	if r := c01 / n0; r < 0.9 {
		t.Fatalf("CH1/CH2 LFP similarity %.2f, want > 0.9", r)
	}
	if r := c0last / math.Sqrt(n0*nl); r > 0.5 {
		t.Fatalf("CH1/CH32 LFP correlation %.2f: the phase should turn along the array", r)
	}
}

func TestSpikes(t *testing.T) {
	cfg := fast()
	cfg.NoiseUV = 0
	cfg.LFPUV = 0
	cfg.Channels = 64
	cfg.SpikeChannels = []int{5, 15, 25, 35, 45}
	s := open(t, cfg)
	const total = 300000 // 10 s
	data, _ := readAll(t, s, 1024, total)
	w := len(s.units[0].template)
	var peaks []float64
	for ui, u := range s.units {
		if u.peak != cfg.SpikeChannels[ui]-1 {
			t.Fatalf("unit %d on channel %d, want %d", ui, u.peak, cfg.SpikeChannels[ui]-1)
		}
		ch := data[u.peak*total : (u.peak+1)*total]
		tmin := float64(0)
		for _, v := range u.template {
			tmin = math.Min(tmin, float64(v))
		}
		// Count troughs (local minima below half the template's).
		var count int
		var lo, hi float64 = math.Inf(1), math.Inf(-1)
		for i := 1; i < total-1; i++ {
			v := float64(ch[i])
			if v < tmin/2 && v <= float64(ch[i-1]) && v < float64(ch[i+1]) {
				count++
				lo, hi = math.Min(lo, v), math.Max(hi, v)
				i += w / 2
			}
		}
		if count < 10 || float64(count) > 10*u.rate*1.5+10 {
			t.Fatalf("unit %d: %d spikes in 10 s at %.1f Hz", ui, count, u.rate)
		}
		// Every trough within ±10% of the template's.
		if lo < tmin*1.11 || hi > tmin*0.89 {
			t.Fatalf("unit %d troughs %.1f..%.1f µV, template %.1f µV", ui, lo, hi, tmin)
		}
		peaks = append(peaks, tmin)
		// Neighbours see smaller spikes, channels beyond the spread none.
		for d := 1; d <= spikeSpread+1; d++ {
			nb := data[(u.peak+d)*total : (u.peak+d+1)*total]
			var m float64
			for _, v := range nb {
				m = math.Min(m, float64(v))
			}
			if d <= spikeSpread && !(m < 0 && m > lo) {
				t.Fatalf("unit %d: channel +%d min %.1f µV, peak channel %.1f", ui, d, m, lo)
			}
			if d > spikeSpread && m != 0 {
				t.Fatalf("unit %d: channel +%d has signal %.1f µV", ui, d, m)
			}
		}
		// Refractory: no two troughs closer than the dead time.
	}
	sort.Float64s(peaks)
	for i := 1; i < len(peaks); i++ {
		if peaks[i]/peaks[i-1] > 0.85 {
			t.Fatalf("unit trough amplitudes not distinct: %v", peaks)
		}
	}
	// Shapes differ too: compare normalised templates of units 0 and 1.
	a, b := s.units[0].template, s.units[1].template
	var dot, na, nb float64
	for k := range a {
		dot += float64(a[k]) * float64(b[k])
		na += float64(a[k]) * float64(a[k])
		nb += float64(b[k]) * float64(b[k])
	}
	if dot/math.Sqrt(na*nb) > 0.995 {
		t.Fatal("units 0 and 1 have the same waveform shape")
	}
}

func TestRefractory(t *testing.T) {
	s := open(t, fast())
	u := &s.units[0]
	prev := int64(-1)
	b := newBlock(t, 32, 1000)
	for i := 0; i < 300; i++ {
		if err := s.ReadBlock(b); err != nil {
			t.Fatal(err)
		}
		if u.prevStart != prev {
			if prev >= 0 && u.prevStart-prev < u.dead {
				t.Fatalf("spikes at %d and %d: closer than the refractory period %d", prev, u.prevStart, u.dead)
			}
			prev = u.prevStart
		}
	}
}

func TestDigital(t *testing.T) {
	cfg := fast()
	cfg.Rate = 20000
	const seconds = 5
	_, dig := readAll(t, open(t, cfg), 999, seconds*20000)
	var pulses int
	for i, w := range dig {
		if want := uint64(0); i%20000 < 10000 {
			want = 1
			if w&1 != want {
				t.Fatalf("sample %d: line 0 = %d, want %d", i, w&1, want)
			}
		} else if w&1 != 0 {
			t.Fatalf("sample %d: line 0 high in the second half of the second", i)
		}
		if w&^3 != 0 {
			t.Fatalf("sample %d: lines beyond 0 and 1 set: %#x", i, w)
		}
		if w&2 != 0 && (i == 0 || dig[i-1]&2 == 0) {
			pulses++
			n := 0
			for i+n < len(dig) && dig[i+n]&2 != 0 {
				n++
			}
			if n < 100 || n > 200 {
				t.Fatalf("pulse at sample %d lasts %d samples, want 5–10 ms", i, n)
			}
		}
	}
	if pulses < 2*seconds || pulses > 5*seconds {
		t.Fatalf("%d pulses on line 1 in %d s", pulses, seconds)
	}
}

func Test1024Channels(t *testing.T) {
	cfg := fast()
	cfg.Channels = 1024
	cfg.Units = 40
	s := open(t, cfg)
	b := newBlock(t, 1024, 512)
	for i := 0; i < 5; i++ {
		if err := s.ReadBlock(b); err != nil {
			t.Fatal(err)
		}
	}
	if b.Samples != 512 || b.FirstSample != 4*512 {
		t.Fatalf("block %d samples from %d", b.Samples, b.FirstSample)
	}
	last := b.Channel(1023)
	var nonzero int
	for _, v := range last {
		if v != 0 {
			nonzero++
		}
	}
	if nonzero < 500 {
		t.Fatalf("CH1024 has %d non-zero samples of 512", nonzero)
	}
	if len(s.Info().Channels) != 1024 || s.Info().Channels[1023].Name != "CH1024" {
		t.Fatal("channel names")
	}
}

func TestValidation(t *testing.T) {
	cases := []struct {
		edit func(*Config)
		want string
	}{
		{func(c *Config) { c.Channels = 0 }, "channels = 0: must be 1–4096"},
		{func(c *Config) { c.Channels = 5000 }, "channels = 5000"},
		{func(c *Config) { c.Rate = 10 }, "rate = 10: must be 1000–100000 Hz"},
		{func(c *Config) { c.NoiseUV = -1 }, "noise_uv = -1"},
		{func(c *Config) { c.NoiseUV = math.NaN() }, "noise_uv = NaN"},
		{func(c *Config) { c.LFPUV = 1e6 }, "lfp_uv = 1e+06"},
		{func(c *Config) { c.Units = -1 }, "units = -1: must be 0–256"},
		{func(c *Config) { c.SpikeChannels = []int{0} }, "spike_channels[0] = 0: must be a channel number 1–32"},
		{func(c *Config) { c.SpikeChannels = []int{1, 33} }, "spike_channels[1] = 33"},
		{func(c *Config) { c.SpikeChannels = []int{1, 2, 3, 4, 5, 6} }, "spike_channels lists 6 channels but units = 5"},
	}
	for _, tc := range cases {
		c := DefaultConfig()
		tc.edit(&c)
		_, err := c.Open()
		if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.HasPrefix(err.Error(), "sim: ") {
			t.Errorf("error %v, want one containing %q", err, tc.want)
		}
	}
	c := DefaultConfig()
	c.Units = 0
	c.SpikeChannels = nil
	if _, err := c.Open(); err != nil {
		t.Errorf("no units: %v", err)
	}
}

func TestBlockShapeAndStart(t *testing.T) {
	c := fast()
	src, err := c.Open()
	if err != nil {
		t.Fatal(err)
	}
	b := newBlock(t, 32, 100)
	if err := src.ReadBlock(b); err == nil {
		t.Fatal("ReadBlock before Start succeeded")
	}
	src.Start()
	if err := src.ReadBlock(newBlock(t, 16, 100)); err == nil || !strings.Contains(err.Error(), "16 channels") {
		t.Fatalf("wrong channel count: %v", err)
	}
	src.Close()
	if err := src.ReadBlock(b); !errors.Is(err, io.EOF) {
		t.Fatalf("after Close: %v, want io.EOF", err)
	}
}

func TestStopUnblocksRealtimeRead(t *testing.T) {
	cfg := DefaultConfig()
	cfg.Rate = 1000
	s := open(t, cfg)
	b := newBlock(t, 32, 10000) // 10 s block
	done := make(chan error, 1)
	go func() { done <- s.ReadBlock(b) }()
	time.Sleep(20 * time.Millisecond)
	s.Stop()
	select {
	case err := <-done:
		if !errors.Is(err, io.EOF) {
			t.Fatalf("ReadBlock after Stop: %v, want io.EOF", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Stop did not unblock ReadBlock")
	}
	if err := s.ReadBlock(b); !errors.Is(err, io.EOF) {
		t.Fatalf("later ReadBlock: %v, want io.EOF", err)
	}
}

func TestRealtimePacing(t *testing.T) {
	cfg := DefaultConfig()
	s := open(t, cfg)
	b := newBlock(t, 32, 300) // 10 ms blocks
	t0 := time.Now()
	for i := 0; i < 10; i++ {
		if err := s.ReadBlock(b); err != nil {
			t.Fatal(err)
		}
	}
	// 100 ms of samples: never earlier than the wall clock (measured from
	// Start, which was before t0, hence the small allowance).
	if el := time.Since(t0); el < 95*time.Millisecond {
		t.Fatalf("100 ms of realtime samples read in %v", el)
	}
}

func TestReadBlockAllocs(t *testing.T) {
	s := open(t, fast())
	b := newBlock(t, 32, 1024)
	s.ReadBlock(b)
	if n := testing.AllocsPerRun(50, func() {
		if err := s.ReadBlock(b); err != nil {
			t.Fatal(err)
		}
	}); n != 0 {
		t.Fatalf("ReadBlock allocates %.1f times per block", n)
	}
}

// BenchmarkSimReadBlock384 reads 384 channels at 30 kHz in blocks of 1024
// samples as fast as possible and reports the speed as a multiple of real
// time.
func BenchmarkSimReadBlock384(b *testing.B) {
	cfg := fast()
	cfg.Channels = 384
	cfg.Units = 20
	s := open(b, cfg)
	blk := newBlock(b, 384, 1024)
	if err := s.ReadBlock(blk); err != nil { // sizes the scratch buffers
		b.Fatal(err)
	}
	b.ReportAllocs()
	b.SetBytes(384 * 1024 * 4)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if err := s.ReadBlock(blk); err != nil {
			b.Fatal(err)
		}
	}
	el := b.Elapsed().Seconds()
	b.ReportMetric(float64(b.N)*1024/30000/el, "x_realtime")
}

func TestPaced(t *testing.T) {
	c := DefaultConfig()
	src, err := c.Open()
	if err != nil {
		t.Fatal(err)
	}
	p, ok := src.(interface{ Realtime() bool })
	if !ok || !p.Realtime() {
		t.Fatal("realtime sim does not report Realtime() = true")
	}
	c.Realtime = false
	src, _ = c.Open()
	if src.(interface{ Realtime() bool }).Realtime() {
		t.Fatal("fast sim reports Realtime() = true")
	}
}
