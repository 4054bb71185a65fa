// Package sim is a simulated headstage: a seeded, deterministic source of
// believable extracellular signals (background noise, LFP oscillations and
// spikes from a handful of units with distinct waveforms) plus two digital
// input lines, paced to the wall clock or as fast as the reader can take
// them.
//
// It registers itself as the source driver "sim", configured by the
// [source.sim] table:
//
//	[source.sim]
//	channels = 32          # 1–4096
//	rate = 30000           # Hz, 1000–100000
//	realtime = true        # false: as fast as possible
//	seed = 1
//	noise_uv = 5.0         # RMS of the background noise, µV
//	lfp_uv = 40.0          # LFP amplitude, µV
//	units = 5              # simulated units
//	spike_channels = []    # 1-based channel numbers (CH1 = 1); default: spread over the array
//	plant_channels = []    # 1-based channels that get planted spikes (default: none)
//	plant_uv = 100.0       # trough depth of a planted spike on its main channel, µV
//	plant_rate = 20.0      # planted spikes per second
//
// Planted spikes are ground truth for tests of spike detection: one known
// waveform (PlantTemplate) at sample numbers that depend only on the seed
// (Config.Planted), in addition to the units' spikes. Each planted spike is
// largest (plant_uv) on one of plant_channels, chosen at random per spike,
// and PlantSideGain of that on the others, so that a group of channels (a
// tetrode) sees each spike best on a different channel. Spike k ≥ 1 lies
// in the k-th slot of 1/plant_rate seconds (slot 0 stays empty, so the
// first spike has samples before it); planted spikes never overlap.
package sim

import (
	"fmt"
	"math"
	"time"

	"github.com/ephysd/ephysd/drivers"
)

// Limits of the configuration values.
const (
	MaxChannels = 4096
	MinRate     = 1000
	MaxRate     = 100000
	MaxUnits    = 256
	MaxNoiseUV  = 1000
	MaxLFPUV    = 5000
	MaxPlantUV  = 10000
)

// Config is the [source.sim] table of the configuration file.
type Config struct {
	// Channels is the number of continuous channels, CH1..CHn.
	Channels int `toml:"channels"`
	// Rate is the sample rate in Hz.
	Rate int `toml:"rate"`
	// Realtime paces blocks to the wall clock; false delivers them as fast
	// as they are read.
	Realtime bool `toml:"realtime"`
	// Seed selects the simulated data: the same seed and configuration give
	// bit-identical samples.
	Seed int64 `toml:"seed"`
	// NoiseUV is the RMS of the Gaussian background noise in µV.
	NoiseUV float64 `toml:"noise_uv"`
	// LFPUV is the amplitude of the LFP oscillations (theta, gamma, delta)
	// in µV on the channel where they are strongest.
	LFPUV float64 `toml:"lfp_uv"`
	// Units is the number of simulated units (neurons).
	Units int `toml:"units"`
	// SpikeChannels lists the channels (1-based, CH1 = 1) at which units
	// have their largest spikes; unit i sits on SpikeChannels[i mod len].
	// Empty spreads the units evenly over the array.
	SpikeChannels []int `toml:"spike_channels"`
	// PlantChannels lists the channels (1-based) that get planted spikes;
	// empty plants none.
	PlantChannels []int `toml:"plant_channels"`
	// PlantUV is the trough depth of a planted spike on its main channel,
	// in µV.
	PlantUV float64 `toml:"plant_uv"`
	// PlantRate is the number of planted spikes per second.
	PlantRate float64 `toml:"plant_rate"`

	// limit, when > 0, ends the stream (io.EOF) after that many samples.
	limit int64
}

// SetDuration makes the source end after d of data (ephysd process
// --duration); 0 means endless.
func (c *Config) SetDuration(d time.Duration) {
	c.limit = int64(math.Round(d.Seconds() * float64(c.Rate)))
}

// DefaultConfig returns the configuration used for keys the file leaves out.
func DefaultConfig() Config {
	return Config{
		Channels:  32,
		Rate:      30000,
		Realtime:  true,
		Seed:      1,
		NoiseUV:   5,
		LFPUV:     40,
		Units:     5,
		PlantUV:   100,
		PlantRate: 20,
	}
}

func init() {
	drivers.RegisterSource("sim", func() drivers.SourceConfig { c := DefaultConfig(); return &c })
}

// Validate checks every value against its allowed range.
func (c *Config) Validate() error {
	if c.Channels < 1 || c.Channels > MaxChannels {
		return fmt.Errorf("sim: channels = %d: must be 1–%d", c.Channels, MaxChannels)
	}
	if c.Rate < MinRate || c.Rate > MaxRate {
		return fmt.Errorf("sim: rate = %d: must be %d–%d Hz", c.Rate, MinRate, MaxRate)
	}
	if !(c.NoiseUV >= 0 && c.NoiseUV <= MaxNoiseUV) {
		return fmt.Errorf("sim: noise_uv = %g: must be 0–%d µV", c.NoiseUV, MaxNoiseUV)
	}
	if !(c.LFPUV >= 0 && c.LFPUV <= MaxLFPUV) {
		return fmt.Errorf("sim: lfp_uv = %g: must be 0–%d µV", c.LFPUV, MaxLFPUV)
	}
	if c.Units < 0 || c.Units > MaxUnits {
		return fmt.Errorf("sim: units = %d: must be 0–%d", c.Units, MaxUnits)
	}
	for i, ch := range c.SpikeChannels {
		if ch < 1 || ch > c.Channels {
			return fmt.Errorf("sim: spike_channels[%d] = %d: must be a channel number 1–%d (CH1 = 1)", i, ch, c.Channels)
		}
	}
	if len(c.SpikeChannels) > c.Units {
		return fmt.Errorf("sim: spike_channels lists %d channels but units = %d: set units to at least %d, or list fewer channels", len(c.SpikeChannels), c.Units, len(c.SpikeChannels))
	}
	for i, ch := range c.PlantChannels {
		if ch < 1 || ch > c.Channels {
			return fmt.Errorf("sim: plant_channels[%d] = %d: must be a channel number 1–%d (CH1 = 1)", i, ch, c.Channels)
		}
	}
	if !(c.PlantUV >= 0 && c.PlantUV <= MaxPlantUV) {
		return fmt.Errorf("sim: plant_uv = %g: must be 0–%d µV", c.PlantUV, MaxPlantUV)
	}
	if maxRate := float64(c.Rate) / float64(2*plantLen(c.Rate)); !(c.PlantRate > 0 && c.PlantRate <= maxRate) {
		return fmt.Errorf("sim: plant_rate = %g: must be > 0 and at most %g spikes per second at %d Hz (each spike's slot holds twice its %d samples)",
			c.PlantRate, math.Floor(maxRate), c.Rate, plantLen(c.Rate))
	}
	return nil
}

// Open validates the configuration and makes the source.
func (c *Config) Open() (drivers.Source, error) {
	if err := c.Validate(); err != nil {
		return nil, err
	}
	return New(*c)
}

// ChannelCount is the number of channels the source will have, known
// before it is opened (the daemon checks channel numbers in other tables
// against it).
func (c *Config) ChannelCount() int { return c.Channels }
