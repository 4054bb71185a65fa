package ftdi

import "github.com/ephysd/ephysd/drivers"

// The FTDI input is registered as the input driver "ftdi" ([input.ftdi]):
// its eight pins are merged into the headstage's digital word.
func init() {
	drivers.RegisterInput("ftdi", func() drivers.InputConfig { c := DefaultInputConfig(); return &c })
}

// Width is the number of input lines: the eight pins of the channel.
func (c *InputConfig) Width() int { return 8 }

// OpenInput opens and starts the input through USBOpener
// (drivers.InputConfig).
func (c *InputConfig) OpenInput() (drivers.LineInput, error) {
	in, err := OpenInput(nil, *c)
	if err != nil {
		return nil, err
	}
	if err := in.Start(); err != nil {
		in.Close()
		return nil, err
	}
	return in, nil
}
