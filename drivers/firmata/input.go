package firmata

import (
	"fmt"
	"time"

	"github.com/ephysd/ephysd/drivers"
)

// InputConfig is the [input.firmata] table: an Arduino whose digital pins
// are reported as input lines, merged into the headstage's digital word.
// Line i of the input is Pins[i].
type InputConfig struct {
	Path        string `toml:"path"`
	Baud        int    `toml:"baud"`
	ResetWaitMS int    `toml:"reset_wait_ms"`
	Pins        []int  `toml:"pins"`
}

func init() {
	drivers.RegisterInput("firmata", func() drivers.InputConfig {
		d := DefaultConfig()
		return &InputConfig{Baud: d.Baud, ResetWaitMS: d.ResetWaitMS}
	})
}

// Width is the number of input lines (one per pin).
func (c *InputConfig) Width() int { return len(c.Pins) }

// OpenInput opens the board as an input only (drivers.InputConfig).
func (c *InputConfig) OpenInput() (drivers.LineInput, error) {
	if len(c.Pins) == 0 {
		return nil, fmt.Errorf("input firmata %s: pins is empty: list the Arduino pins to report, e.g. pins = [2, 3]", c.Path)
	}
	bc := Config{Path: c.Path, Baud: c.Baud, ResetWaitMS: c.ResetWaitMS, PulseMS: 1, ReportInputs: c.Pins}
	b, err := bc.OpenBoard(nil)
	if err != nil {
		return nil, err
	}
	return &pinLines{b: b, pins: c.Pins}, nil
}

// pinLines renumbers the board's pins (bit n = pin n) as lines 0..len(pins)-1.
type pinLines struct {
	b    *Board
	pins []int
}

func (p *pinLines) Lines() (uint64, time.Time) {
	w, at := p.b.Lines()
	var out uint64
	for i, pin := range p.pins {
		if w&(1<<uint(pin)) != 0 {
			out |= 1 << uint(i)
		}
	}
	return out, at
}

func (p *pinLines) Err() error { return p.b.Err() }

// LinkStats is the board's (drivers.LinkCounter).
func (p *pinLines) LinkStats() drivers.LinkStats { return p.b.LinkStats() }
func (p *pinLines) Close() error                 { return p.b.Close() }
