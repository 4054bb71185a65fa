package daemon

import (
	"errors"
	"fmt"
	"io"
	"regexp"

	"github.com/pelletier/go-toml/v2"

	"github.com/ephysd/ephysd/pipeline"
	"github.com/ephysd/ephysd/pipeline/spikedetect"
	"github.com/ephysd/ephysd/recording"
)

// SpikeDetectorName is the processor name of the built-in spike detector,
// as in Open Ephys.
const SpikeDetectorName = spikedetect.StageName

// checkSpikes checks the [spikes] table: every value, and the channel
// numbers when the source's configuration tells its channel count (the
// others are checked against the device when acquisition starts).
func (c *Config) checkSpikes(data []byte) error {
	if !c.Spikes.Enabled() {
		var raw map[string]any
		if toml.Unmarshal(data, &raw) != nil {
			return nil
		}
		if _, ok := raw["spikes"]; !ok {
			return nil // no [spikes] table: no detector
		}
	}
	err := c.Spikes.Validate()
	if err == nil {
		if cc, ok := c.Driver.(interface{ ChannelCount() int }); ok {
			err = c.Spikes.CheckChannels(cc.ChannelCount())
		}
	}
	return c.spikeError(data, err)
}

// spikeError turns the detector's configuration errors into ConfigErrors
// with the key's line.
func (c *Config) spikeError(data []byte, err error) error {
	var ke *spikedetect.KeyError
	if err == nil || !errors.As(err, &ke) {
		return err
	}
	key := "spikes." + ke.Key
	// keyLine knows arrays of tables (electrode[2]), not list elements.
	line := keyLine(data, trailingIndex.ReplaceAllString(key, ""))
	return &ConfigError{File: c.path, Line: line, Key: key, Msg: ke.Msg}
}

var trailingIndex = regexp.MustCompile(`\[\d+\]$`)

// spikeDetectorID is the processor id of the spike detector: the first id
// after the Python stages that the record node does not take.
func spikeDetectorID(cfg *Config) int {
	id := firstStageID + len(cfg.Stages)
	node := cfg.Recording.RecordNodeID
	if node == 0 {
		node = id
	}
	for id == node {
		id++
	}
	return id
}

// newSpikeDetector makes the chain's spike detector for a stream, and its
// description for the recorder; nil when [spikes] defines no electrodes.
func newSpikeDetector(cfg *Config, info pipeline.StreamInfo, blockSamples int) (*spikedetect.Detector, []recording.SpikeSource, error) {
	if !cfg.Spikes.Enabled() {
		return nil, nil, nil
	}
	d, err := spikedetect.New(cfg.Spikes, spikedetect.Stream{
		Channels: len(info.Channels), SampleRate: info.SampleRate, BlockSamples: blockSamples,
		Processor: spikeDetectorID(cfg),
	})
	if err != nil {
		var ke *spikedetect.KeyError
		if errors.As(err, &ke) {
			return nil, nil, fmt.Errorf("%s: spikes.%s: %s (the source %q)", cfg.path, ke.Key, ke.Msg, info.ProcessorName)
		}
		return nil, nil, err
	}
	src := recording.SpikeSource{ProcessorID: d.Processor(), ProcessorName: SpikeDetectorName}
	for _, e := range d.Electrodes() {
		src.Electrodes = append(src.Electrodes, recording.Electrode{Name: e.Name, Channels: e.Channels, PrePeakSamples: e.PrePeakSamples})
	}
	return d, []recording.SpikeSource{src}, nil
}

// PythonStageTime is the histogram of Python stage i's time per block
// (the runner's stages are the spike detector, if any, then the Python
// stages).
func (c *Chain) PythonStageTime(i int) *pipeline.Histogram {
	if c.Spikes != nil {
		i++
	}
	return c.Runner.StageTime(i)
}

// ElectrodeSpikes is the spike count of one electrode.
type ElectrodeSpikes struct {
	Electrode string `json:"electrode"`
	Spikes    uint64 `json:"spikes"`
}

// spikeCounts returns the chain's spikes per electrode, nil without a
// detector.
func (c *Chain) spikeCounts() []ElectrodeSpikes {
	if c == nil || c.Spikes == nil {
		return nil
	}
	counts := c.Spikes.Counts()
	out := make([]ElectrodeSpikes, len(counts))
	for i, e := range c.Spikes.Electrodes() {
		out[i] = ElectrodeSpikes{Electrode: e.Name, Spikes: counts[i]}
	}
	return out
}

// printSpikes is the spike detector's line of `ephysd process`'s summary.
func printSpikes(w io.Writer, c *Chain) {
	var total uint64
	counts := c.spikeCounts()
	for _, e := range counts {
		total += e.Spikes
	}
	h := c.Runner.StageTime(0)
	fmt.Fprintf(w, "spikes      %d on %d electrodes (%d cut by gaps or the ends); detector per block p50 %s  p99 %s\n",
		total, len(counts), c.Spikes.Cut(), fmtDur(h.Quantile(0.5)), fmtDur(h.Quantile(0.99)))
}
