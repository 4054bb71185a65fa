package sim

import (
	"math"
	"strings"
	"testing"
)

// The template has its minimum, −1, at the trough index alone, with both
// neighbours at most 70% of it up to 30 kHz, and starts and ends at zero.
func TestPlantTemplate(t *testing.T) {
	for _, rate := range []int{20000, 30000, 40000} {
		tpl, trough := PlantTemplate(rate)
		if len(tpl) != plantLen(rate) || trough != int(math.Round(plantTroughMS*float64(rate)/1000)) {
			t.Fatalf("%d Hz: %d samples, trough at %d", rate, len(tpl), trough)
		}
		if tpl[trough] != -1 || tpl[0] != 0 || math.Abs(float64(tpl[len(tpl)-1])) > 0.02 {
			t.Fatalf("%d Hz: trough %v, ends %v %v", rate, tpl[trough], tpl[0], tpl[len(tpl)-1])
		}
		for i, v := range tpl {
			if i != trough && v <= -1 {
				t.Fatalf("%d Hz: sample %d = %v is as deep as the trough", rate, i, v)
			}
		}
		if rate <= 30000 && (tpl[trough-1] < -0.7 || tpl[trough+1] < -0.7) {
			t.Fatalf("%d Hz: the trough's neighbours %v %v are deeper than 70%%", rate, tpl[trough-1], tpl[trough+1])
		}
	}
}

// Without noise, LFP or units, the signal is exactly the planted spikes:
// the template, plant_uv deep on the main channel and PlantSideGain of that
// on the other planted channels, at the sample numbers Planted reports;
// the other channels are zero. The same for any block length.
func TestPlantedSpikesAreExact(t *testing.T) {
	cfg := fast()
	cfg.Channels = 8
	cfg.NoiseUV, cfg.LFPUV, cfg.Units = 0, 0, 0
	cfg.PlantChannels = []int{2, 3, 6}
	cfg.PlantUV = 150
	cfg.PlantRate = 50
	const total = 30000
	tpl, trough := PlantTemplate(cfg.Rate)
	planted := cfg.Planted(0, total)
	if len(planted) < 45 || len(planted) > 50 {
		t.Fatalf("%d spikes planted in 1 s at 50 per second", len(planted))
	}
	mains := map[int]int{}
	want := make([]float32, cfg.Channels*total)
	for i, p := range planted {
		if i > 0 && p.SampleNumber-planted[i-1].SampleNumber < int64(len(tpl)) {
			t.Fatalf("spikes %d and %d overlap: %d, %d", i-1, i, planted[i-1].SampleNumber, p.SampleNumber)
		}
		if p.SampleNumber < int64(cfg.Rate)/50 {
			t.Fatalf("spike at %d in the first, empty slot", p.SampleNumber)
		}
		mains[p.Channel]++
		for _, ch := range cfg.PlantChannels {
			g := float32(cfg.PlantUV)
			if ch-1 != p.Channel {
				g *= PlantSideGain
			}
			start := int(p.SampleNumber) - trough
			for k, v := range tpl {
				if start+k < total {
					want[(ch-1)*total+start+k] += g * v
				}
			}
		}
	}
	if len(mains) != 3 {
		t.Fatalf("main channels %v: want each of the three planted channels", mains)
	}
	for _, blockLen := range []int{1, 7, 1024} {
		got, _ := readAll(t, open(t, cfg), blockLen, total)
		for i := range want {
			if got[i] != want[i] {
				t.Fatalf("block length %d: channel %d sample %d = %v, want %v", blockLen, i/total, i%total, got[i], want[i])
			}
		}
	}
	// Planted over sub-ranges agrees with the whole.
	var joined []PlantedSpike
	for from := int64(0); from < total; from += 4321 {
		joined = append(joined, cfg.Planted(from, min(from+4321, total))...)
	}
	if len(joined) != len(planted) {
		t.Fatalf("Planted over pieces: %d spikes, whole: %d", len(joined), len(planted))
	}
	for i := range joined {
		if joined[i] != planted[i] {
			t.Fatalf("spike %d: %+v vs %+v", i, joined[i], planted[i])
		}
	}
	// Another seed plants elsewhere.
	other := cfg
	other.Seed = 2
	if o := other.Planted(0, total); len(o) > 0 && o[0] == planted[0] && o[1] == planted[1] {
		t.Fatal("seed 2 plants the same spikes as seed 1")
	}
}

func TestPlantValidation(t *testing.T) {
	cases := []struct {
		edit func(*Config)
		want string
	}{
		{func(c *Config) { c.PlantChannels = []int{0} }, "plant_channels[0] = 0: must be a channel number 1–32"},
		{func(c *Config) { c.PlantChannels = []int{33} }, "plant_channels[0] = 33"},
		{func(c *Config) { c.PlantUV = -5 }, "plant_uv = -5"},
		{func(c *Config) { c.PlantRate = 0 }, "plant_rate = 0: must be > 0 and at most 312"},
		{func(c *Config) { c.PlantRate = 400 }, "plant_rate = 400"},
	}
	for _, tc := range cases {
		c := DefaultConfig()
		tc.edit(&c)
		_, err := c.Open()
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("error %v, want one containing %q", err, tc.want)
		}
	}
}
