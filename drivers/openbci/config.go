// Package openbci is the driver for the OpenBCI Cyton board (8 EEG channels
// at 250 Hz) and the Cyton with its Daisy module (16 channels at 125 Hz),
// streaming through the OpenBCI USB dongle (an FTDI serial port).
//
// It registers itself as the source driver "openbci", configured by the
// [source.openbci] table:
//
//	[source.openbci]
//	path = "/dev/ttyUSB0"   # the dongle (required; `ephysd devices` lists serial ports)
//	baud = 115200
//	daisy = false           # true: Cyton + Daisy, 16 channels at 125 Hz
//	gain = []               # per-channel ADS1299 gain (1, 2, 4, 6, 8, 12, 24); empty: 24 everywhere
//	accelerometer = true    # add the AX, AY, AZ channels (g)
//	timeout_ms = 5000       # how long to wait for each reply of the start-up handshake
//
// Channels are CH1..CH8 (CH1..CH16 with the Daisy) in µV ("uV"), then, with
// accelerometer = true, AX, AY, AZ in g ("g"). The accelerometer sends a new
// value about every tenth packet and zeros in between; a zero triple means
// "no new value", so the last value is held (0 g until the first one) —
// that holds a reading, it does not invent a sample.
//
// Recording resolution (bit_volts): one int16 step of an EEG channel is
// BitVoltsCounts (16) ADC counts at that channel's gain: 0.358 µV at gain 24,
// so the recording holds ±11.7 mV — EEG of a few hundred µV riding on
// electrode offsets of up to ±11 mV — and the 4 dropped bits lie below the
// ADS1299's own noise (about 6 counts RMS at gain 24). At gain 1 the step is
// 8.6 µV and the range ±281 mV. The accelerometer's step is its own
// resolution, 0.000125 g (range ±4.096 g).
package openbci

import (
	"fmt"

	"github.com/ephysd/ephysd/drivers"
)

// Gains are the ADS1299 gains, in the order of their codes 0..6 in the
// channel-settings command.
var Gains = [...]int{1, 2, 4, 6, 8, 12, 24}

// DefaultGain is the gain the board uses after the `d` command.
const DefaultGain = 24

// Config is the [source.openbci] table of the configuration file.
type Config struct {
	// Path is the dongle's serial device, e.g. /dev/ttyUSB0 or a
	// /dev/serial/by-id/ link.
	Path string `toml:"path"`
	// Baud is the line rate of the dongle (115200 unless it was changed).
	Baud int `toml:"baud"`
	// Daisy selects the Cyton + Daisy (16 channels, 125 Hz); false is the
	// Cyton alone (8 channels, 250 Hz).
	Daisy bool `toml:"daisy"`
	// Gain lists the per-channel ADS1299 gains (1, 2, 4, 6, 8, 12 or 24),
	// CH1 first; empty means 24 on every channel. Its length must be the
	// channel count (8, or 16 with the Daisy).
	Gain []int `toml:"gain"`
	// Accelerometer adds the channels AX, AY, AZ (g).
	Accelerometer bool `toml:"accelerometer"`
	// TimeoutMS is how long Start waits for each reply of the handshake.
	TimeoutMS int `toml:"timeout_ms"`
}

// DefaultConfig returns the configuration used for keys the file leaves out.
func DefaultConfig() Config {
	return Config{Baud: 115200, Accelerometer: true, TimeoutMS: 5000}
}

func init() {
	drivers.RegisterSource("openbci", func() drivers.SourceConfig { c := DefaultConfig(); return &c })
}

// EEGChannels is the number of EEG channels: 8, or 16 with the Daisy.
func (c *Config) EEGChannels() int {
	if c.Daisy {
		return 16
	}
	return 8
}

// SampleRate is the stream's rate: 250 Hz, or 125 Hz with the Daisy.
func (c *Config) SampleRate() float64 {
	if c.Daisy {
		return 125
	}
	return 250
}

// Validate checks every value and names the key that is wrong.
func (c *Config) Validate() error {
	if c.Path == "" {
		return fmt.Errorf("openbci: path is missing: set path = \"/dev/ttyUSB0\" in [source.openbci] to the dongle's serial device (`ephysd devices` lists them)")
	}
	if c.Baud <= 0 {
		return fmt.Errorf("openbci: baud = %d: must be the dongle's line rate, normally 115200", c.Baud)
	}
	n := c.EEGChannels()
	if len(c.Gain) != 0 && len(c.Gain) != n {
		return fmt.Errorf("openbci: gain lists %d values but the board has %d channels (daisy = %v): list one gain per channel, or leave gain out for 24 everywhere", len(c.Gain), n, c.Daisy)
	}
	for i, g := range c.Gain {
		if gainCode(g) < 0 {
			return fmt.Errorf("openbci: gain[%d] = %d (CH%d): must be one of 1, 2, 4, 6, 8, 12, 24", i, g, i+1)
		}
	}
	if c.TimeoutMS < 100 || c.TimeoutMS > 60000 {
		return fmt.Errorf("openbci: timeout_ms = %d: must be 100–60000 milliseconds (default 5000)", c.TimeoutMS)
	}
	return nil
}

// gains returns the gain of every channel.
func (c *Config) gains() []int {
	g := make([]int, c.EEGChannels())
	for i := range g {
		g[i] = DefaultGain
		if i < len(c.Gain) {
			g[i] = c.Gain[i]
		}
	}
	return g
}

// gainCode is the command code 0..6 of a gain, or -1.
func gainCode(g int) int {
	for i, v := range Gains {
		if v == g {
			return i
		}
	}
	return -1
}

// Open validates the configuration, opens the serial device and makes the
// source. The board is not touched until Start.
func (c *Config) Open() (drivers.Source, error) {
	if err := c.Validate(); err != nil {
		return nil, err
	}
	return New(*c)
}
