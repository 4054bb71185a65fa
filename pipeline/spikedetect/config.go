package spikedetect

import (
	"fmt"
	"math"
	"strings"
)

// Polarity is the direction of the threshold crossings that start a spike.
type Polarity string

// The polarities. Extracellular spikes are negative-going, hence the default.
const (
	// Negative detects the signal falling to −threshold or below and aligns
	// on the most negative sample.
	Negative Polarity = "negative"
	// Positive detects the signal rising to +threshold or above and aligns
	// on the most positive sample.
	Positive Polarity = "positive"
	// Both detects either crossing and aligns on the sample of largest
	// absolute value.
	Both Polarity = "both"
)

// Defaults for the keys the configuration leaves out.
const (
	DefaultThresholdMAD      = 5.0
	DefaultWaveformSamples   = 40 // as Open Ephys: 1.33 ms at 30 kHz
	DefaultPrePeakSamples    = 8
	DefaultPeakSearchSamples = 16
	DefaultDeadTimeMS        = 1.0
	DefaultNoiseWindowS      = 4.0
	DefaultNoiseUpdateS      = 2.0
)

// Limits of the configuration values.
const (
	MaxWaveformSamples = 1024
	MaxDeadTimeMS      = 1000
	MaxGroup           = 64 // channels in one electrode
)

// Config is the [spikes] table: the detector's settings and its electrodes.
//
//	[spikes]
//	threshold_mad = 5.0        # or threshold_uv = 50.0; default 5 × the noise σ̂
//	polarity = "negative"      # negative | positive | both
//	waveform_samples = 40
//	pre_peak_samples = 8
//	peak_search_samples = 16   # the peak is looked for this many samples from the crossing on
//	dead_time_ms = 1.0
//	highpass_hz = 0            # > 0: detect on a 2nd-order Butterworth high-pass of the input
//	noise_window_s = 4.0
//	noise_update_s = 2.0
//	auto_group = 0             # N > 0: electrodes of N consecutive channels over the whole array
//
//	[[spikes.electrode]]
//	name = "Tetrode 1"         # default by size: Electrode n, Stereotrode n, Tetrode n, Polytrode n
//	channels = [1, 2, 3, 4]    # 1-based channel numbers (CH1 = 1)
//	threshold_uv = 60.0        # optional: overrides the table's threshold for this electrode
//	polarity = "both"          # optional
type Config struct {
	// ThresholdUV is a fixed threshold in µV, a magnitude (> 0): the
	// polarity gives its sign. Set ThresholdUV or ThresholdMAD, not both.
	ThresholdUV *float64 `toml:"threshold_uv"`
	// ThresholdMAD is a threshold as a multiple of each channel's noise
	// σ̂ = median(|x|) / 0.6745 (default 5).
	ThresholdMAD *float64 `toml:"threshold_mad"`
	// Polarity is negative (default), positive or both.
	Polarity Polarity `toml:"polarity"`
	// WaveformSamples is the length of a spike's waveform.
	WaveformSamples int `toml:"waveform_samples"`
	// PrePeakSamples is how many of the waveform's samples come before the
	// peak: the waveform is peak−pre … peak+(length−pre−1).
	PrePeakSamples int `toml:"pre_peak_samples"`
	// PeakSearchSamples is the search window for the peak: the crossing's
	// sample and the ones after it, this many in all.
	PeakSearchSamples int `toml:"peak_search_samples"`
	// DeadTimeMS is the refractory period after a peak in which the
	// electrode detects no new spike.
	DeadTimeMS float64 `toml:"dead_time_ms"`
	// HighpassHz, when > 0, makes the detector work on a 2nd-order
	// Butterworth high-pass of the input (waveforms included); 0 (default)
	// works on the samples as they come.
	HighpassHz float64 `toml:"highpass_hz"`
	// NoiseWindowS is the span of signal the noise estimate covers.
	NoiseWindowS float64 `toml:"noise_window_s"`
	// NoiseUpdateS is how often each channel's noise estimate is renewed.
	NoiseUpdateS float64 `toml:"noise_update_s"`
	// AutoGroup, when > 0, makes electrodes of AutoGroup consecutive
	// channels over the whole array (1: single electrodes, 2: stereotrodes,
	// 4: tetrodes; the last may be smaller) instead of listing them.
	AutoGroup int `toml:"auto_group"`
	// Electrodes are the [[spikes.electrode]] tables.
	Electrodes []ElectrodeConfig `toml:"electrode"`
}

// ElectrodeConfig is one [[spikes.electrode]]: a group of channels seen by
// one detector (a single channel, a stereotrode, a tetrode, any group).
type ElectrodeConfig struct {
	// Name names the electrode in spikes, metrics and recordings. Default:
	// by size and position — "Electrode n" (1 channel), "Stereotrode n"
	// (2), "Tetrode n" (4), "Polytrode n" (other sizes), n counting the
	// electrodes of that size from 1 in configuration order.
	Name string `toml:"name"`
	// Channels are 1-based channel numbers (CH1 = 1).
	Channels []int `toml:"channels"`
	// ThresholdUV and ThresholdMAD override the table's threshold.
	ThresholdUV  *float64 `toml:"threshold_uv"`
	ThresholdMAD *float64 `toml:"threshold_mad"`
	// Polarity overrides the table's polarity.
	Polarity Polarity `toml:"polarity"`
}

// DefaultConfig returns the settings used for the keys a [spikes] table
// leaves out. It has no electrodes: the detector is off until some are
// configured.
func DefaultConfig() Config {
	return Config{
		Polarity:          Negative,
		WaveformSamples:   DefaultWaveformSamples,
		PrePeakSamples:    DefaultPrePeakSamples,
		PeakSearchSamples: DefaultPeakSearchSamples,
		DeadTimeMS:        DefaultDeadTimeMS,
		NoiseWindowS:      DefaultNoiseWindowS,
		NoiseUpdateS:      DefaultNoiseUpdateS,
	}
}

// Enabled reports whether the configuration defines any electrode.
func (c *Config) Enabled() bool { return len(c.Electrodes) > 0 || c.AutoGroup > 0 }

// KeyError is a configuration mistake: the key (relative to the [spikes]
// table, e.g. "electrode[2].channels") and what is wrong with it.
type KeyError struct {
	Key string
	Msg string
}

func (e *KeyError) Error() string { return "spikes." + e.Key + ": " + e.Msg }

// Validate checks every value that does not depend on the stream. Channel
// numbers are checked against the source by New.
func (c *Config) Validate() error {
	bad := func(key, format string, a ...any) error { return &KeyError{Key: key, Msg: fmt.Sprintf(format, a...)} }
	if err := checkThreshold("", c.ThresholdUV, c.ThresholdMAD); err != nil {
		return err
	}
	if err := checkPolarity("polarity", c.Polarity, false); err != nil {
		return err
	}
	if c.WaveformSamples < 2 || c.WaveformSamples > MaxWaveformSamples {
		return bad("waveform_samples", "%d: must be 2–%d samples (default %d)", c.WaveformSamples, MaxWaveformSamples, DefaultWaveformSamples)
	}
	if c.PrePeakSamples < 0 || c.PrePeakSamples >= c.WaveformSamples {
		return bad("pre_peak_samples", "%d: must be 0–%d, less than waveform_samples = %d (the peak is one of the waveform's samples)",
			c.PrePeakSamples, c.WaveformSamples-1, c.WaveformSamples)
	}
	if c.PeakSearchSamples < 1 || c.PeakSearchSamples > c.WaveformSamples-c.PrePeakSamples {
		return bad("peak_search_samples", "%d: must be 1–%d (at most waveform_samples − pre_peak_samples, so the peak's waveform ends after the search; default %d)",
			c.PeakSearchSamples, c.WaveformSamples-c.PrePeakSamples, DefaultPeakSearchSamples)
	}
	if !(c.DeadTimeMS >= 0 && c.DeadTimeMS <= MaxDeadTimeMS) {
		return bad("dead_time_ms", "%v: must be 0–%d milliseconds (default %v)", c.DeadTimeMS, MaxDeadTimeMS, DefaultDeadTimeMS)
	}
	if !(c.HighpassHz >= 0) || math.IsInf(c.HighpassHz, 0) {
		return bad("highpass_hz", "%v: must be ≥ 0 Hz (0: no filter), below half the sample rate", c.HighpassHz)
	}
	if !(c.NoiseWindowS >= 0.1 && c.NoiseWindowS <= 3600) {
		return bad("noise_window_s", "%v: must be 0.1–3600 seconds (default %v)", c.NoiseWindowS, DefaultNoiseWindowS)
	}
	if !(c.NoiseUpdateS >= 0.01 && c.NoiseUpdateS <= 3600) {
		return bad("noise_update_s", "%v: must be 0.01–3600 seconds (default %v)", c.NoiseUpdateS, DefaultNoiseUpdateS)
	}
	if c.AutoGroup < 0 || c.AutoGroup > MaxGroup {
		return bad("auto_group", "%d: must be 1–%d channels per electrode (0: list the electrodes instead)", c.AutoGroup, MaxGroup)
	}
	if c.AutoGroup > 0 && len(c.Electrodes) > 0 {
		return bad("auto_group", "set auto_group or list [[spikes.electrode]] tables, not both")
	}
	if !c.Enabled() {
		return bad("electrode", "no electrodes: add [[spikes.electrode]] tables with channels = [...], or set auto_group")
	}
	for i, e := range c.Electrodes {
		where := fmt.Sprintf("electrode[%d]", i+1)
		if err := checkThreshold(where+".", e.ThresholdUV, e.ThresholdMAD); err != nil {
			return err
		}
		if err := checkPolarity(where+".polarity", e.Polarity, true); err != nil {
			return err
		}
		if strings.TrimSpace(e.Name) != e.Name {
			return bad(where+".name", "%q has leading or trailing spaces", e.Name)
		}
		if strings.ContainsAny(e.Name, "/\\\x00") {
			return bad(where+".name", "%q: a name becomes a folder name in recordings, so it may not contain / or \\", e.Name)
		}
		if len(e.Channels) == 0 {
			return bad(where+".channels", "empty: list the electrode's 1-based channel numbers, like channels = [1, 2, 3, 4]")
		}
		if len(e.Channels) > MaxGroup {
			return bad(where+".channels", "%d channels: an electrode has at most %d", len(e.Channels), MaxGroup)
		}
		seen := map[int]bool{}
		for j, ch := range e.Channels {
			if ch < 1 {
				return bad(fmt.Sprintf("%s.channels[%d]", where, j+1), "%d: channel numbers start at 1 (CH1 = 1)", ch)
			}
			if seen[ch] {
				return bad(where+".channels", "channel %d is listed twice", ch)
			}
			seen[ch] = true
		}
	}
	names := c.names(0)
	first := map[string]int{}
	for i, n := range names {
		if j, dup := first[n]; dup {
			return bad(fmt.Sprintf("electrode[%d].name", i+1), "%q is also the name of electrode[%d]: give each electrode its own name", n, j+1)
		}
		first[n] = i
	}
	return nil
}

// CheckChannels checks the electrodes' channel numbers against a source of
// channels channels.
func (c *Config) CheckChannels(channels int) error {
	for i, e := range c.Electrodes {
		for j, ch := range e.Channels {
			if ch > channels {
				return &KeyError{Key: fmt.Sprintf("electrode[%d].channels[%d]", i+1, j+1),
					Msg: fmt.Sprintf("channel %d does not exist: the source has %d channels (CH1–CH%d)", ch, channels, channels)}
			}
		}
	}
	return nil
}

func checkThreshold(prefix string, uv, mad *float64) error {
	if uv != nil && mad != nil {
		return &KeyError{Key: prefix + "threshold_uv", Msg: "set threshold_uv or threshold_mad, not both"}
	}
	if uv != nil && !(*uv > 0 && *uv < 1e6) {
		return &KeyError{Key: prefix + "threshold_uv", Msg: fmt.Sprintf("%v: must be a magnitude > 0 µV (polarity gives the direction)", *uv)}
	}
	if mad != nil && !(*mad > 0 && *mad <= 1000) {
		return &KeyError{Key: prefix + "threshold_mad", Msg: fmt.Sprintf("%v: must be a multiple of the noise σ̂ > 0 (typically 4–6)", *mad)}
	}
	return nil
}

func checkPolarity(key string, p Polarity, emptyOK bool) error {
	switch p {
	case Negative, Positive, Both:
		return nil
	case "":
		if emptyOK {
			return nil
		}
	}
	return &KeyError{Key: key, Msg: fmt.Sprintf("%q: use \"negative\", \"positive\" or \"both\"", p)}
}

// groupNames is the default name of an electrode by its channel count.
func groupName(channels int) string {
	switch channels {
	case 1:
		return "Electrode"
	case 2:
		return "Stereotrode"
	case 4:
		return "Tetrode"
	}
	return "Polytrode"
}

// names returns the electrodes' names, defaults filled in. channels is the
// source's channel count, needed for auto_group only.
func (c *Config) names(channels int) []string {
	groups := c.groups(channels)
	counts := map[string]int{}
	out := make([]string, len(groups))
	for i, g := range groups {
		kind := groupName(len(g))
		counts[kind]++
		if i < len(c.Electrodes) && c.Electrodes[i].Name != "" {
			out[i] = c.Electrodes[i].Name
		} else {
			out[i] = fmt.Sprintf("%s %d", kind, counts[kind])
		}
	}
	return out
}

// groups returns each electrode's 1-based channel numbers.
func (c *Config) groups(channels int) [][]int {
	if c.AutoGroup == 0 {
		out := make([][]int, len(c.Electrodes))
		for i, e := range c.Electrodes {
			out[i] = e.Channels
		}
		return out
	}
	var out [][]int
	for first := 1; first <= channels; first += c.AutoGroup {
		var g []int
		for ch := first; ch < first+c.AutoGroup && ch <= channels; ch++ {
			g = append(g, ch)
		}
		out = append(out, g)
	}
	return out
}
