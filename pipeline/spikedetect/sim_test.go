package spikedetect_test

import (
	"math"
	"testing"

	"github.com/ephysd/ephysd/drivers/sim"
	"github.com/ephysd/ephysd/pipeline"
	"github.com/ephysd/ephysd/pipeline/spikedetect"
)

// simulate runs the simulator (as configured) for seconds through d in
// blocks of blockLen samples and returns the spikes.
func simulate(t testing.TB, cfg sim.Config, d *spikedetect.Detector, blockLen int, seconds float64) []pipeline.Spike {
	t.Helper()
	cfg.Realtime = false
	src, err := sim.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := src.Start(); err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	pool, err := pipeline.NewPool(4, cfg.Channels, blockLen)
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close(false)
	var out []pipeline.Spike
	total := int64(seconds * float64(cfg.Rate))
	for next := int64(0); next < total; {
		b := pool.TryGet()
		if err := src.ReadBlock(b); err != nil {
			t.Fatal(err)
		}
		next = b.FirstSample + int64(b.Samples)
		if err := d.Process(b); err != nil {
			t.Fatal(err)
		}
		for _, sp := range b.Spikes {
			out = append(out, copied(sp))
		}
		b.Release()
	}
	return out
}

func quietSim(channels int) sim.Config {
	cfg := sim.DefaultConfig()
	cfg.Channels = channels
	cfg.NoiseUV, cfg.LFPUV, cfg.Units = 5, 0, 0
	return cfg
}

// Planted spikes on a tetrode in 5 µV noise are all found at 5×MAD, each at
// the planted trough's exact sample number, with the largest waveform on
// the planted main channel; nothing else is found on the tetrode.
func TestFindsPlantedSpikes(t *testing.T) {
	for _, blockLen := range []int{7, 30} {
		cfg := quietSim(8)
		cfg.PlantChannels = []int{1, 2, 3, 4}
		cfg.PlantUV = 100
		cfg.PlantRate = 50
		dc := spikedetect.DefaultConfig()
		dc.Electrodes = []spikedetect.ElectrodeConfig{{Channels: []int{1, 2, 3, 4}}}
		d := newDetector(t, dc, cfg.Channels, blockLen)
		const seconds = 4
		got := simulate(t, cfg, d, blockLen, seconds)
		// The first noise estimate needs 1024 samples; a spike's waveform
		// must end within the data read.
		planted := cfg.Planted(1024, int64(seconds*cfg.Rate)-32)
		if len(planted) < 150 {
			t.Fatalf("only %d spikes planted", len(planted))
		}
		if len(got) != len(planted) {
			t.Fatalf("blocks of %d: %d spikes found, %d planted", blockLen, len(got), len(planted))
		}
		mains := map[int]bool{}
		for i, p := range planted {
			sp := got[i]
			if sp.SampleNumber != p.SampleNumber || sp.Electrode != "Tetrode 1" {
				t.Fatalf("blocks of %d: spike %d found on %s at %d, planted at %d", blockLen, i, sp.Electrode, sp.SampleNumber, p.SampleNumber)
			}
			deepest, at := float32(0), -1
			for c := 0; c < 4; c++ {
				if v := sp.Waveform[c*40+8]; v < deepest {
					deepest, at = v, c
				}
			}
			if at != p.Channel {
				t.Fatalf("spike %d is deepest on channel %d, planted on %d", i, at, p.Channel)
			}
			mains[at] = true
		}
		if len(mains) != 4 {
			t.Fatalf("the spikes were found on channels %v only", mains)
		}
		if noise := d.NoiseUV(0); math.Abs(noise-5) > 0.5 {
			t.Errorf("σ̂ of channel 1 = %.2f µV, the simulator's noise is 5 µV", noise)
		}
	}
}

// With the simulator's LFP (40 µV oscillations) on top, the built-in
// high-pass lets a 5×MAD threshold find the planted spikes again (within a
// sample: the filter reshapes them), where without it the LFP inflates σ̂.
func TestHighpassFindsSpikesUnderLFP(t *testing.T) {
	cfg := quietSim(4)
	cfg.LFPUV = 200
	cfg.PlantChannels = []int{2}
	cfg.PlantUV = 80
	cfg.PlantRate = 50
	const seconds = 4
	planted := cfg.Planted(1024, int64(seconds*cfg.Rate)-32)
	dc := spikedetect.DefaultConfig()
	dc.Electrodes = []spikedetect.ElectrodeConfig{{Channels: []int{2}}}
	raw := simulate(t, cfg, newDetector(t, dc, 4, 30), 30, seconds)
	if len(raw) > len(planted)/2 {
		t.Fatalf("without a filter %d of %d spikes were found under 200 µV of LFP: the test shows nothing", len(raw), len(planted))
	}
	dc.HighpassHz = 300
	d := newDetector(t, dc, 4, 30)
	got := simulate(t, cfg, d, 30, seconds)
	// Each planted spike is found within a sample. The high-pass turns each
	// spike's net positive area into an undershoot of a few µV for a couple
	// of milliseconds after it, where noise crosses the threshold a little
	// more often than elsewhere: a few such extra spikes are allowed, right
	// after a planted one, nowhere else.
	extra, j := 0, 0
	for _, sp := range got {
		for j < len(planted) && planted[j].SampleNumber < sp.SampleNumber-1 {
			j++
		}
		if j < len(planted) && sp.SampleNumber-planted[j].SampleNumber >= -1 {
			if sp.SampleNumber-planted[j].SampleNumber <= 1 {
				continue // found
			}
		}
		extra++
		if j == 0 || sp.SampleNumber-planted[j-1].SampleNumber > int64(cfg.Rate)*3/1000 {
			t.Fatalf("a spike at %d, not within 3 ms after a planted one", sp.SampleNumber)
		}
	}
	if found := len(got) - extra; found != len(planted) {
		t.Fatalf("%d of %d planted spikes found within a sample", found, len(planted))
	}
	if extra > len(planted)/20 {
		t.Fatalf("%d extra spikes after %d planted ones", extra, len(planted))
	}
	if noise := d.NoiseUV(1); noise > 6 {
		t.Errorf("σ̂ of the high-passed channel = %.2f µV", noise)
	}
}

// phi is the standard normal distribution function.
func phi(x float64) float64 { return 0.5 * math.Erfc(-x/math.Sqrt2) }

// Noise alone. For white Gaussian noise a downward crossing of −kσ happens
// at a sample with probability p = Φ(−k)(1 − Φ(−k)). At k = 5 that is
// 2.9e-7 per sample: 32 channels × 10 s at 30 kHz expect 2.8 false
// positives; the test allows 20 (σ̂ from 1024 values is a few percent off,
// and 5% lower σ̂ doubles the rate). At 3σ (p = 1.35e-3) the count must
// match the theory within 10% — after the 5% the dead time and search
// window take (crossings within ~31 samples of a spike are not new
// spikes) — which shows the detector does see crossings.
func TestNoiseOnlyFalsePositives(t *testing.T) {
	cfg := quietSim(32)
	const seconds = 10
	n := float64(cfg.Channels) * seconds * float64(cfg.Rate)

	dc := spikedetect.DefaultConfig()
	dc.AutoGroup = 1
	dc.ThresholdMAD = f(5)
	d := newDetector(t, dc, cfg.Channels, 30)
	fp := len(simulate(t, cfg, d, 30, seconds))
	expect := n * phi(-5) * (1 - phi(-5))
	t.Logf("5×MAD: %d false positives in %.0f channel-samples (Gaussian noise: %.1f expected)", fp, n, expect)
	if fp > 20 {
		t.Fatalf("%d false positives at 5×MAD, expected about %.1f", fp, expect)
	}
	for ch := 0; ch < cfg.Channels; ch++ {
		if sd := d.NoiseUV(ch); math.Abs(sd-5) > 0.5 {
			t.Errorf("channel %d: σ̂ = %.2f µV, the noise is 5 µV", ch, sd)
		}
	}

	dc.ThresholdMAD = nil
	dc.ThresholdUV = f(3 * cfg.NoiseUV)
	got := len(simulate(t, cfg, newDetector(t, dc, cfg.Channels, 30), 30, seconds))
	p := phi(-3) * (1 - phi(-3))
	want := n * p * (1 - 31*p)
	t.Logf("3σ: %d crossings, %.0f expected", got, want)
	if math.Abs(float64(got)-want) > 0.1*want {
		t.Fatalf("%d spikes at 3σ, expected %.0f ± 10%%", got, want)
	}
}
