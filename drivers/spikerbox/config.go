// Package spikerbox is the driver for the Backyard Brains SpikerBox family
// (Neuron SpikerBox Pro over USB CDC, Heart & Brain SpikerBox over FTDI,
// and the other boxes that speak the same serial protocol).
//
// It registers itself as the source driver "spikerbox", configured by the
// [source.spikerbox] table:
//
//	[source.spikerbox]
//	path = "/dev/ttyACM0"   # required
//	baud = 222222           # FTDI boxes (Heart & Brain: 222222); CDC boxes ignore it
//	channels = 2            # sent to the box as c:N;
//	rate = 10000            # Hz, the box's rate for that channel count (the host cannot set it)
//	bits = 10               # ADC resolution
//	scale_uv = 1.0          # µV per ADC count
//	event_pulse_ms = 1.0    # length of the TTL pulse made from an EVNT message
//
// Samples: value − 2^(bits−1) (512 for 10 bits) times scale_uv, in "uV".
// The default scale_uv = 1 records ADC counts: Backyard Brains publishes no
// calibrated gain for its boxes, so set scale_uv to your box's µV per count
// (the ADC step divided by the amplifier gain) when you know it. The
// recording's bit_volts is scale_uv: one int16 step is one ADC count, exact.
//
// Events: the box reports an expansion-port event as a message EVNT:n;.
// Event n (0–9) is TTL input line n (Open Ephys shows line n as "TTL n+1"):
// the line goes high at the first sample completed after the message and
// stays high for event_pulse_ms (at least one sample), so the pipeline
// turns it into a rising and a falling TTL event. An event on a line that
// is still high ends that pulse for one sample and starts a new one, so
// every EVNT gives its own rising edge.
//
// Damage: the protocol has no checksum and no sample counter. Bytes that
// fit no frame (garbage, a frame cut short, a corrupted byte) are dropped
// and counted (discarded bytes, resyncs), and the next good frame is
// numbered after a gap of as many samples as the dropped bytes would have
// filled, rounded up — one for a cut or corrupted frame. Frames lost whole
// cannot be seen, and garbage inserted between frames leaves a gap too.
package spikerbox

import (
	"fmt"
	"math"

	"github.com/ephysd/ephysd/drivers"
)

// Limits of the configuration values.
const (
	MaxChannels = 16
	MinRate     = 100
	MaxRate     = 100000
	MinBits     = 8
	MaxBits     = 14
	// EventLines is the number of expansion-port event lines (EVNT:0–9).
	EventLines = 10
)

// Config is the [source.spikerbox] table of the configuration file.
type Config struct {
	// Path is the box's serial device (/dev/ttyACM0 for CDC boxes,
	// /dev/ttyUSB0 for FTDI ones, or a /dev/serial/by-id/ link).
	Path string `toml:"path"`
	// Baud is the line rate of FTDI boxes; CDC boxes ignore it.
	Baud int `toml:"baud"`
	// Channels is the number of channels the box is told to send (c:N;).
	Channels int `toml:"channels"`
	// Rate is the box's sample rate in Hz for that channel count.
	Rate float64 `toml:"rate"`
	// Bits is the ADC resolution; samples are centred at 2^(bits−1).
	Bits int `toml:"bits"`
	// ScaleUV is µV per ADC count.
	ScaleUV float64 `toml:"scale_uv"`
	// EventPulseMS is how long a TTL line stays high for one EVNT message.
	EventPulseMS float64 `toml:"event_pulse_ms"`
}

// DefaultConfig returns the configuration used for keys the file leaves out.
func DefaultConfig() Config {
	return Config{Baud: 222222, Channels: 2, Rate: 10000, Bits: 10, ScaleUV: 1, EventPulseMS: 1}
}

func init() {
	drivers.RegisterSource("spikerbox", func() drivers.SourceConfig { c := DefaultConfig(); return &c })
}

func finite(x float64) bool { return !math.IsNaN(x) && !math.IsInf(x, 0) }

// Validate checks every value and names the key that is wrong.
func (c *Config) Validate() error {
	if c.Path == "" {
		return fmt.Errorf("spikerbox: path is missing: set path = \"/dev/ttyACM0\" in [source.spikerbox] to the box's serial device (`ephysd devices` lists them)")
	}
	if c.Baud <= 0 {
		return fmt.Errorf("spikerbox: baud = %d: must be the box's line rate (222222 for the Heart & Brain SpikerBox; CDC boxes ignore it)", c.Baud)
	}
	if c.Channels < 1 || c.Channels > MaxChannels {
		return fmt.Errorf("spikerbox: channels = %d: must be 1–%d", c.Channels, MaxChannels)
	}
	if !finite(c.Rate) || c.Rate < MinRate || c.Rate > MaxRate {
		return fmt.Errorf("spikerbox: rate = %v: must be %d–%d Hz, the box's rate for %d channels", c.Rate, MinRate, MaxRate, c.Channels)
	}
	if c.Bits < MinBits || c.Bits > MaxBits {
		return fmt.Errorf("spikerbox: bits = %d: must be %d–%d (10 for most boxes)", c.Bits, MinBits, MaxBits)
	}
	if !finite(c.ScaleUV) || c.ScaleUV <= 0 {
		return fmt.Errorf("spikerbox: scale_uv = %v: must be > 0 µV per ADC count", c.ScaleUV)
	}
	if !finite(c.EventPulseMS) || c.EventPulseMS <= 0 || c.EventPulseMS > 1000 {
		return fmt.Errorf("spikerbox: event_pulse_ms = %v: must be > 0 and ≤ 1000 ms", c.EventPulseMS)
	}
	return nil
}

// Open validates the configuration, opens the serial device and makes the
// source. The box is not told anything until Start.
func (c *Config) Open() (drivers.Source, error) {
	if err := c.Validate(); err != nil {
		return nil, err
	}
	return New(*c)
}
