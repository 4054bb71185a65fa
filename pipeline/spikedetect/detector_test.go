package spikedetect_test

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/ephysd/ephysd/pipeline"
	"github.com/ephysd/ephysd/pipeline/spikedetect"
)

const rate = 30000

func f(v float64) *float64 { return &v }

// signal is channel-major test data: channel c is x[c*n:(c+1)*n].
type signal struct {
	channels, n int
	x           []float32
}

func newSignal(channels, n int) *signal {
	return &signal{channels: channels, n: n, x: make([]float32, channels*n)}
}

func (s *signal) ch(c int) []float32 { return s.x[c*s.n : (c+1)*s.n] }

// vShape is a test spike: depth at the peak, 60% and 30% of it one and two
// samples away.
var vShape = []float32{0.3, 0.6, 1, 0.6, 0.3}

// put adds vShape × amp with its peak at sample at of channel c.
func (s *signal) put(c, at int, amp float32) {
	for k, v := range vShape {
		s.ch(c)[at-2+k] += amp * v
	}
}

// noise adds Gaussian noise of sd µV to every channel.
func (s *signal) noise(seed uint64, sd float64) {
	r := rand.New(rand.NewPCG(seed, 7))
	for i := range s.x {
		s.x[i] += float32(r.NormFloat64() * sd)
	}
}

// copied is a spike taken out of its block, waveform copied.
func copied(sp pipeline.Spike) pipeline.Spike {
	sp.Waveform = slices.Clone(sp.Waveform)
	return sp
}

// run feeds s to d in blocks of blockLen samples (the first at sample
// number first), from a small pool as the runner does, and returns the
// spikes with the number of the block they came in.
func run(t testing.TB, d *spikedetect.Detector, s *signal, blockLen int, first int64) (spikes []pipeline.Spike, blockOf []int) {
	t.Helper()
	pool, err := pipeline.NewPool(3, s.channels, blockLen)
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close(false)
	for i, blk := 0, 0; i < s.n; i, blk = i+blockLen, blk+1 {
		b := pool.TryGet()
		n := min(blockLen, s.n-i)
		b.Samples = n
		b.FirstSample = first + int64(i)
		for c := 0; c < s.channels; c++ {
			copy(b.Data[c*n:(c+1)*n], s.ch(c)[i:i+n])
		}
		if err := d.Process(b); err != nil {
			t.Fatal(err)
		}
		for _, sp := range b.Spikes {
			spikes = append(spikes, copied(sp))
			blockOf = append(blockOf, blk)
		}
		b.Release()
	}
	return spikes, blockOf
}

func newDetector(t testing.TB, cfg spikedetect.Config, channels, blockLen int) *spikedetect.Detector {
	t.Helper()
	d, err := spikedetect.New(cfg, spikedetect.Stream{Channels: channels, SampleRate: rate, BlockSamples: blockLen, Processor: 100})
	if err != nil {
		t.Fatal(err)
	}
	if err := d.StartAcquisition(); err != nil {
		t.Fatal(err)
	}
	return d
}

func uvConfig(thr float64, electrodes ...[]int) spikedetect.Config {
	cfg := spikedetect.DefaultConfig()
	cfg.ThresholdUV = f(thr)
	for _, e := range electrodes {
		cfg.Electrodes = append(cfg.Electrodes, spikedetect.ElectrodeConfig{Channels: e})
	}
	return cfg
}

func sampleNumbers(spikes []pipeline.Spike) []int64 {
	var out []int64
	for _, sp := range spikes {
		out = append(out, sp.SampleNumber)
	}
	return out
}

// Negative, positive and both: each polarity finds exactly the crossings
// of its direction, aligned on the peak, and nothing below the threshold.
func TestThresholdUVPolarities(t *testing.T) {
	s := newSignal(1, 3000)
	s.put(0, 500, -80)  // negative spike
	s.put(0, 1000, 80)  // positive spike
	s.put(0, 1500, -40) // below threshold
	s.put(0, 2000, 40)
	s.put(0, 2500, -50.5) // just beyond it, one sample only
	for _, c := range []struct {
		pol  spikedetect.Polarity
		want []int64
	}{
		{spikedetect.Negative, []int64{500, 2500}},
		{spikedetect.Positive, []int64{1000}},
		{spikedetect.Both, []int64{500, 1000, 2500}},
	} {
		cfg := uvConfig(50, []int{1})
		cfg.Polarity = c.pol
		d := newDetector(t, cfg, 1, 30)
		got, _ := run(t, d, s, 30, 0)
		if !slices.Equal(sampleNumbers(got), c.want) {
			t.Errorf("%s: spikes at %v, want %v", c.pol, sampleNumbers(got), c.want)
		}
		for _, sp := range got {
			if sp.Processor != 100 || sp.Electrode != "Electrode 1" || sp.ElectrodeIndex != 0 || sp.SortedID != 0 ||
				sp.Channels != 1 || sp.Samples != 40 || len(sp.Waveform) != 40 {
				t.Errorf("%s: spike %+v", c.pol, sp)
			}
			// The peak is the waveform's sample pre_peak_samples.
			if p := sp.Waveform[8]; math.Abs(float64(p)) < 50 {
				t.Errorf("%s: waveform[8] = %v is not the peak", c.pol, p)
			}
		}
		if n := d.Counts()[0]; n != uint64(len(c.want)) {
			t.Errorf("%s: Counts %d", c.pol, n)
		}
	}
}

// The peak is the extremum over all the electrode's channels in the
// search window: a crossing on one channel, a deeper peak on another a few
// samples later gives the later sample; a deeper peak after the window
// does not count.
func TestAlignmentOnPeakAcrossChannels(t *testing.T) {
	s := newSignal(4, 2000)
	s.put(1, 300, -60)
	s.put(3, 305, -120) // within the 16-sample window from the crossing at 300
	s.put(0, 800, -60)
	s.put(2, 850, -200) // after the window and the dead time: a spike of its own
	d := newDetector(t, uvConfig(50, []int{1, 2, 3, 4}), 4, 30)
	got, _ := run(t, d, s, 30, 0)
	if want := []int64{305, 800, 850}; !slices.Equal(sampleNumbers(got), want) {
		t.Fatalf("spikes at %v, want %v", sampleNumbers(got), want)
	}
	if got[0].Electrode != "Tetrode 1" || got[0].Channels != 4 || len(got[0].Waveform) != 4*40 {
		t.Fatalf("spike %+v", got[0])
	}
	// Channel-major: channel 3's part has the −120 peak at index 8.
	if v := got[0].Waveform[3*40+8]; v != -120 {
		t.Fatalf("waveform of channel 4 at the peak = %v", v)
	}
}

// A tetrode detects a spike on whichever channel carries it.
func TestTetrodeDetectsOnAnyChannel(t *testing.T) {
	s := newSignal(4, 4000)
	for c := 0; c < 4; c++ {
		s.put(c, 500+800*c, -90)
	}
	d := newDetector(t, uvConfig(50, []int{1, 2, 3, 4}), 4, 30)
	got, _ := run(t, d, s, 30, 0)
	if want := []int64{500, 1300, 2100, 2900}; !slices.Equal(sampleNumbers(got), want) {
		t.Fatalf("spikes at %v, want %v", sampleNumbers(got), want)
	}
	for i, sp := range got {
		if sp.Waveform[i*40+8] != -90 {
			t.Fatalf("spike %d: channel %d has %v at the peak", i, i+1, sp.Waveform[i*40+8])
		}
	}
}

// For blocks of 1, 7, 30 and 1024 samples the spikes are the same, even
// those whose waveform straddles one or many blocks, each comes in the
// block holding the last sample of its waveform, and every waveform equals
// the input samples peak−8 … peak+31 exactly.
func TestBlockStraddlingSpikesAreExact(t *testing.T) {
	const n = 6000
	s := newSignal(3, n)
	s.noise(1, 5)
	peaks := []int{5, 40, 990, 1030, 1075, 2047, 2100, 3000, 3050, 4095, 5960, 5985}
	for i, p := range peaks {
		s.put(i%3, p, -100)
	}
	var first []pipeline.Spike
	for _, blockLen := range []int{1, 7, 30, 1024} {
		cfg := uvConfig(50, []int{1, 2, 3})
		d := newDetector(t, cfg, 3, blockLen)
		got, blockOf := run(t, d, s, blockLen, 1000)
		// 5 (its waveform would start before the stream) and 5985 (it
		// would end after it) cannot be complete.
		want := []int64{1040, 1990, 2030, 2075, 3047, 3100, 4000, 4050, 5095, 6960}
		if !slices.Equal(sampleNumbers(got), want) {
			t.Fatalf("blocks of %d: spikes at %v, want %v", blockLen, sampleNumbers(got), want)
		}
		if d.Cut() != 1 {
			t.Errorf("blocks of %d: %d cut, want 1 (the spike at sample 5)", blockLen, d.Cut())
		}
		for i, sp := range got {
			peak := int(sp.SampleNumber - 1000)
			for c := 0; c < 3; c++ {
				want := s.ch(c)[peak-8 : peak+32]
				if !slices.Equal(sp.Waveform[c*40:(c+1)*40], want) {
					t.Fatalf("blocks of %d: spike at %d, channel %d: waveform differs from the input", blockLen, sp.SampleNumber, c)
				}
			}
			if last := peak + 31; blockOf[i] != last/blockLen {
				t.Fatalf("blocks of %d: spike at %d came in block %d, its last sample is in block %d", blockLen, sp.SampleNumber, blockOf[i], last/blockLen)
			}
		}
		if first == nil {
			first = got
		}
	}
}

// Dead time: a second spike 25 samples after the first is ignored with
// 1 ms (30 samples) of dead time and found with 0.5 ms.
func TestDeadTime(t *testing.T) {
	s := newSignal(1, 3000)
	s.put(0, 1000, -100)
	s.put(0, 1025, -100)
	s.put(0, 2000, -100)
	for _, c := range []struct {
		ms   float64
		want []int64
	}{
		{1, []int64{1000, 2000}},
		{0.5, []int64{1000, 1025, 2000}},
	} {
		cfg := uvConfig(50, []int{1})
		cfg.DeadTimeMS = c.ms
		d := newDetector(t, cfg, 1, 30)
		got, _ := run(t, d, s, 30, 0)
		if !slices.Equal(sampleNumbers(got), c.want) {
			t.Errorf("dead time %v ms: spikes at %v, want %v", c.ms, sampleNumbers(got), c.want)
		}
	}
}

// A signal that stays beyond the threshold makes one spike: a new one needs
// a new crossing.
func TestNoSecondSpikeWithoutANewCrossing(t *testing.T) {
	s := newSignal(1, 1000)
	for i := 300; i < 600; i++ {
		s.ch(0)[i] = -70
	}
	s.ch(0)[450] = -90
	d := newDetector(t, uvConfig(50, []int{1}), 1, 30)
	got, _ := run(t, d, s, 30, 0)
	if want := []int64{300}; !slices.Equal(sampleNumbers(got), want) {
		t.Fatalf("spikes at %v, want %v", sampleNumbers(got), want)
	}
}

// A gap in the sample numbers drops the spike whose waveform it would cut
// and counts it; detection goes on after it.
func TestGapCutsSpikes(t *testing.T) {
	d := newDetector(t, uvConfig(50, []int{1}), 1, 30)
	a := newSignal(1, 600)
	a.put(0, 590, -100) // its waveform needs samples after 600
	b := newSignal(1, 600)
	b.put(0, 300, -100)
	got, _ := run(t, d, a, 30, 0)
	more, _ := run(t, d, b, 30, 5000) // 4400 samples lost
	got = append(got, more...)
	if want := []int64{5300}; !slices.Equal(sampleNumbers(got), want) {
		t.Fatalf("spikes at %v, want %v", sampleNumbers(got), want)
	}
	if d.Cut() != 1 {
		t.Fatalf("%d cut, want 1", d.Cut())
	}
}

// The noise σ̂ follows median(|x|)/0.6745: for Gaussian noise it is the
// standard deviation. A 5×MAD threshold finds spikes of 8σ and ignores
// those of 2σ.
func TestThresholdMAD(t *testing.T) {
	const n = 5 * rate
	s := newSignal(2, n)
	s.noise(3, 10)
	var big []int64
	for at := 2000; at < n-100; at += 1500 {
		s.put(0, at, -80)
		s.put(1, at+700, -20)
		big = append(big, int64(at))
	}
	cfg := spikedetect.DefaultConfig()
	cfg.ThresholdMAD = f(5)
	cfg.Electrodes = []spikedetect.ElectrodeConfig{{Channels: []int{1}}, {Channels: []int{2}}}
	d := newDetector(t, cfg, 2, 30)
	if d.NoiseUV(0) != 0 {
		t.Fatal("a noise estimate before any data")
	}
	got, _ := run(t, d, s, 30, 0)
	for ch := 0; ch < 2; ch++ {
		if sd := d.NoiseUV(ch); math.Abs(sd-10) > 1.5 {
			t.Errorf("channel %d: σ̂ = %.2f µV, want 10 ± 1.5", ch, sd)
		}
	}
	var found []int64
	for _, sp := range got {
		if sp.Electrode != "Electrode 1" {
			t.Errorf("a spike on %s at %d (2σ spikes, 5σ threshold)", sp.Electrode, sp.SampleNumber)
			continue
		}
		found = append(found, sp.SampleNumber)
	}
	// Noise may move a peak by a sample: each 8σ spike is found within ±1.
	if len(found) != len(big) {
		t.Fatalf("%d spikes found, %d planted: %v", len(found), len(big), found)
	}
	for i := range big {
		if d := found[i] - big[i]; d < -1 || d > 1 {
			t.Fatalf("spike %d found at %d, planted at %d", i, found[i], big[i])
		}
	}
}

// The noise estimate follows a change of the noise level within the
// window, and until a channel's first estimate it detects nothing.
func TestNoiseEstimateFollowsTheSignal(t *testing.T) {
	const n = 12 * rate
	s := newSignal(1, n)
	r := rand.New(rand.NewPCG(9, 9))
	for i := range s.x {
		sd := 5.0
		if i >= n/2 {
			sd = 20
		}
		s.x[i] = float32(r.NormFloat64() * sd)
	}
	s.put(0, 500, -200) // in the first 1024 samples: no estimate yet
	cfg := spikedetect.DefaultConfig()
	cfg.Electrodes = []spikedetect.ElectrodeConfig{{Channels: []int{1}}}
	d := newDetector(t, cfg, 1, 30)
	half := &signal{channels: 1, n: n / 2, x: s.x[:n/2]}
	got, _ := run(t, d, half, 30, 0)
	if len(got) > 0 && got[0].SampleNumber == 500 {
		t.Fatal("a spike before the first noise estimate")
	}
	if sd := d.NoiseUV(0); math.Abs(sd-5) > 0.75 {
		t.Fatalf("σ̂ = %.2f after 6 s of σ = 5 µV", sd)
	}
	rest := &signal{channels: 1, n: n / 2, x: s.x[n/2:]}
	run(t, d, rest, 30, n/2)
	if sd := d.NoiseUV(0); math.Abs(sd-20) > 3 {
		t.Fatalf("σ̂ = %.2f µV 6 s after the noise went to σ = 20 µV (window 4 s)", sd)
	}
}

// In steady state a block costs no allocation, spikes included.
func TestNoAllocationPerBlock(t *testing.T) {
	const channels, blockLen = 16, 30
	cfg := spikedetect.DefaultConfig()
	cfg.AutoGroup = 4
	cfg.HighpassHz = 300
	d := newDetector(t, cfg, channels, blockLen)
	s := newSignal(channels, 60*blockLen)
	s.noise(5, 5)
	for c := 0; c < channels; c++ {
		s.put(c, 100+c*100, -150)
	}
	pool, _ := pipeline.NewPool(4, channels, blockLen)
	defer pool.Close(false)
	var sample int64
	spikes := 0
	step := func() {
		b := pool.TryGet()
		i := int(sample % int64(s.n))
		for c := 0; c < channels; c++ {
			copy(b.Data[c*blockLen:(c+1)*blockLen], s.ch(c)[i:i+blockLen])
		}
		b.FirstSample = sample
		sample += blockLen
		if err := d.Process(b); err != nil {
			t.Fatal(err)
		}
		spikes += len(b.Spikes)
		b.Release()
	}
	for range 3000 { // warm-up: noise estimates, every block's buffers
		step()
	}
	spikes = 0
	if a := testing.AllocsPerRun(2000, step); a != 0 {
		t.Fatalf("%.2f allocations per block", a)
	}
	if spikes < 100 {
		t.Fatalf("only %d spikes during the measurement: it measured nothing", spikes)
	}
}

func TestConfigErrors(t *testing.T) {
	one := []spikedetect.ElectrodeConfig{{Channels: []int{1}}}
	cases := []struct {
		name string
		edit func(*spikedetect.Config)
		want string
	}{
		{"no electrodes", func(c *spikedetect.Config) { c.Electrodes = nil }, "spikes.electrode: no electrodes"},
		{"empty group", func(c *spikedetect.Config) { c.Electrodes = []spikedetect.ElectrodeConfig{{}} }, "spikes.electrode[1].channels: empty"},
		{"channel 0", func(c *spikedetect.Config) { c.Electrodes[0].Channels = []int{0} }, "spikes.electrode[1].channels[1]: 0: channel numbers start at 1"},
		{"twice", func(c *spikedetect.Config) { c.Electrodes[0].Channels = []int{3, 3} }, "channel 3 is listed twice"},
		{"both thresholds", func(c *spikedetect.Config) { c.ThresholdUV, c.ThresholdMAD = f(50), f(5) }, "spikes.threshold_uv: set threshold_uv or threshold_mad, not both"},
		{"negative µV", func(c *spikedetect.Config) { c.Electrodes[0].ThresholdUV = f(-50) }, "spikes.electrode[1].threshold_uv: -50: must be a magnitude > 0"},
		{"zero MAD", func(c *spikedetect.Config) { c.ThresholdMAD = f(0) }, "spikes.threshold_mad: 0"},
		{"polarity", func(c *spikedetect.Config) { c.Polarity = "down" }, `spikes.polarity: "down": use "negative", "positive" or "both"`},
		{"electrode polarity", func(c *spikedetect.Config) { c.Electrodes[0].Polarity = "up" }, `spikes.electrode[1].polarity: "up"`},
		{"pre ≥ length", func(c *spikedetect.Config) { c.PrePeakSamples = 40 }, "spikes.pre_peak_samples: 40: must be 0–39, less than waveform_samples = 40"},
		{"short waveform", func(c *spikedetect.Config) { c.WaveformSamples = 1 }, "spikes.waveform_samples: 1"},
		{"search too long", func(c *spikedetect.Config) { c.PeakSearchSamples = 33 }, "spikes.peak_search_samples: 33: must be 1–32"},
		{"dead time", func(c *spikedetect.Config) { c.DeadTimeMS = -1 }, "spikes.dead_time_ms: -1"},
		{"highpass", func(c *spikedetect.Config) { c.HighpassHz = math.NaN() }, "spikes.highpass_hz: NaN"},
		{"window", func(c *spikedetect.Config) { c.NoiseWindowS = 0 }, "spikes.noise_window_s: 0"},
		{"auto and list", func(c *spikedetect.Config) { c.AutoGroup = 4 }, "spikes.auto_group: set auto_group or list"},
		{"duplicate names", func(c *spikedetect.Config) {
			c.Electrodes = []spikedetect.ElectrodeConfig{{Channels: []int{1}}, {Channels: []int{2}, Name: "Electrode 1"}}
		}, `spikes.electrode[2].name: "Electrode 1" is also the name of electrode[1]`},
		{"slash", func(c *spikedetect.Config) { c.Electrodes[0].Name = "a/b" }, "may not contain /"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			cfg := spikedetect.DefaultConfig()
			cfg.Electrodes = slices.Clone(one)
			c.edit(&cfg)
			err := cfg.Validate()
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("error %v, want one containing %q", err, c.want)
			}
			var ke *spikedetect.KeyError
			if !errors.As(err, &ke) {
				t.Fatalf("%T is not a KeyError", err)
			}
		})
	}
	// Channels beyond the stream, and a filter beyond Nyquist, are found by New.
	cfg := uvConfig(50, []int{1, 2}, []int{31, 33})
	_, err := spikedetect.New(cfg, spikedetect.Stream{Channels: 32, SampleRate: rate, BlockSamples: 30})
	if err == nil || !strings.Contains(err.Error(), "spikes.electrode[2].channels[2]: channel 33 does not exist: the source has 32 channels (CH1–CH32)") {
		t.Fatalf("error %v", err)
	}
	cfg = uvConfig(50, []int{1})
	cfg.HighpassHz = 20000
	if _, err := spikedetect.New(cfg, spikedetect.Stream{Channels: 1, SampleRate: rate, BlockSamples: 30}); err == nil || !strings.Contains(err.Error(), "spikes.highpass_hz") {
		t.Fatalf("error %v", err)
	}
}

// Default names count the electrodes of each size; auto_group covers the
// array, the last group taking what is left.
func TestElectrodeNames(t *testing.T) {
	cfg := spikedetect.DefaultConfig()
	cfg.Electrodes = []spikedetect.ElectrodeConfig{
		{Channels: []int{1, 2, 3, 4}}, {Channels: []int{5}}, {Channels: []int{6, 7, 8, 9}, Name: "Left CA1"},
		{Channels: []int{10, 11, 12, 13}}, {Channels: []int{14, 15}}, {Channels: []int{16, 17, 18}},
	}
	d := newDetector(t, cfg, 18, 30)
	var names []string
	for _, e := range d.Electrodes() {
		names = append(names, e.Name)
	}
	if want := []string{"Tetrode 1", "Electrode 1", "Left CA1", "Tetrode 3", "Stereotrode 1", "Polytrode 1"}; !slices.Equal(names, want) {
		t.Fatalf("names %q, want %q", names, want)
	}
	cfg = spikedetect.DefaultConfig()
	cfg.AutoGroup = 4
	d = newDetector(t, cfg, 10, 30)
	es := d.Electrodes()
	if len(es) != 3 || es[0].Name != "Tetrode 1" || es[1].Name != "Tetrode 2" || es[2].Name != "Stereotrode 1" ||
		!slices.Equal(es[2].Channels, []int{8, 9}) || es[0].ThresholdMAD != 5 || es[0].Polarity != spikedetect.Negative {
		t.Fatalf("auto_group = 4 over 10 channels: %+v", es)
	}
}

// Spikes of several electrodes in one block come in sample-number order.
func TestSpikesOfABlockAreInOrder(t *testing.T) {
	s := newSignal(3, 2000)
	s.put(2, 500, -100)
	s.put(1, 505, -100)
	s.put(0, 510, -100)
	d := newDetector(t, uvConfig(50, []int{1}, []int{2}, []int{3}), 3, 1024)
	got, _ := run(t, d, s, 1024, 0)
	if want := []int64{500, 505, 510}; !slices.Equal(sampleNumbers(got), want) {
		t.Fatalf("spikes at %v, want %v", sampleNumbers(got), want)
	}
	if got[0].Electrode != "Electrode 3" || got[2].ElectrodeIndex != 0 {
		t.Fatalf("%s %d", got[0].Electrode, got[2].ElectrodeIndex)
	}
}

func ExampleDetector() {
	cfg := spikedetect.DefaultConfig()
	cfg.ThresholdUV = f(50)
	cfg.Electrodes = []spikedetect.ElectrodeConfig{{Channels: []int{1, 2}}}
	d, _ := spikedetect.New(cfg, spikedetect.Stream{Channels: 2, SampleRate: 30000, BlockSamples: 64, Processor: 100})
	pool, _ := pipeline.NewPool(1, 2, 64)
	b := pool.TryGet()
	b.Data[64+20] = -80 // channel 2, sample 20
	d.Process(b)
	for _, sp := range b.Spikes {
		fmt.Println(sp.Electrode, sp.SampleNumber, sp.Channels, sp.Samples, sp.Waveform[40+8])
	}
	// Output: Stereotrode 1 20 2 40 -80
}

// With highpass_hz the detector works on, and cuts waveforms from, a 2nd-order
// Butterworth high-pass of the input: the waveforms equal scipy's
// sosfilt(butter(2, 300, "highpass")) of the whole signal (started in its
// steady state for the first sample, as the detector starts), for any block
// length.
func TestHighpassMatchesScipy(t *testing.T) {
	const n = 2 * rate
	s := newSignal(1, n)
	s.noise(11, 5)
	for i := range s.x {
		s.x[i] += float32(300 + 150*math.Sin(2*math.Pi*8*float64(i)/rate))
	}
	for at := 3000; at < n-100; at += 2000 {
		s.put(0, at, -100)
	}
	dir := t.TempDir()
	raw := make([]byte, 0, 4*n)
	for _, v := range s.x {
		raw = binaryAppendFloat32(raw, v)
	}
	if err := os.WriteFile(filepath.Join(dir, "x.f32"), raw, 0o644); err != nil {
		t.Fatal(err)
	}
	var got []pipeline.Spike
	for _, blockLen := range []int{1, 30, 1024} {
		cfg := uvConfig(50, []int{1})
		cfg.HighpassHz = 300
		spikes, _ := run(t, newDetector(t, cfg, 1, blockLen), s, blockLen, 0)
		if len(spikes) != 29 {
			t.Fatalf("blocks of %d: %d spikes, 29 planted", blockLen, len(spikes))
		}
		if got == nil {
			got = spikes
		}
		for i := range spikes {
			if spikes[i].SampleNumber != got[i].SampleNumber || !slices.Equal(spikes[i].Waveform, got[i].Waveform) {
				t.Fatalf("blocks of %d: spike %d differs from blocks of 1", blockLen, i)
			}
		}
	}
	var wf []byte
	var sn []string
	for _, sp := range got {
		for _, v := range sp.Waveform {
			wf = binaryAppendFloat32(wf, v)
		}
		sn = append(sn, fmt.Sprint(sp.SampleNumber))
	}
	if err := os.WriteFile(filepath.Join(dir, "w.f32"), wf, 0o644); err != nil {
		t.Fatal(err)
	}
	out := python(t, `
import sys, numpy as np
from scipy import signal
d = sys.argv[1]
x = np.fromfile(d + "/x.f32", dtype="<f4").astype(np.float64)
w = np.fromfile(d + "/w.f32", dtype="<f4").reshape(-1, 40)
sn = [int(v) for v in sys.argv[2].split(",")]
sos = signal.butter(2, 300, btype="highpass", fs=30000, output="sos")
y = signal.sosfilt(sos, x, zi=signal.sosfilt_zi(sos) * x[0])[0]
err = max(np.abs(w[i] - y[p - 8:p + 32]).max() for i, p in enumerate(sn))
assert err < 1e-3, err
for i, p in enumerate(sn):
    assert y[p] == y[p - 3:p + 13].min(), (p, "not the minimum of its window")
print("max error %.2g µV" % err)
`, dir, strings.Join(sn, ","))
	t.Log(strings.TrimSpace(out))
}

func binaryAppendFloat32(b []byte, v float32) []byte {
	return binary.LittleEndian.AppendUint32(b, math.Float32bits(v))
}

// python runs a check in Debian's Python (numpy, scipy).
func python(t *testing.T, script string, args ...string) string {
	t.Helper()
	cmd := exec.Command("/usr/bin/python3", append([]string{"-I", "-c", script}, args...)...)
	cmd.Env = []string{"PATH=/usr/bin:/bin", "LC_ALL=C.UTF-8"}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("python check: %v\n%s", err, out)
	}
	return string(out)
}
