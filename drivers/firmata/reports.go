package firmata

// Messages a StandardFirmata board sends.
const (
	AnalogMessage = 0xE0 // | pin, LSB, MSB
	StartSysex    = 0xF0
	EndSysex      = 0xF7
)

// MaxSysex is the longest sysex message (F0 … F7) ReportParser accepts;
// one without its F7 by then is dropped as damaged, so that a lost F7
// cannot swallow the digital reports after it.
const MaxSysex = 1024

// ReportParser splits what a board sends into Firmata messages and calls
// back for every digital port report. It does no I/O: feed it bytes as
// they arrive, in any split; what it reports depends only on the bytes.
//
// A message starts with a command byte (most significant bit set);
// digital (9p), analog (Ep) and version (F9) messages have two data bytes,
// sysex runs from F0 to F7. A digital report's second data byte holds
// only the port's pin 7 (0 or 1): a larger one marks the report as
// corrupted. Bytes that belong to no message — data bytes outside one,
// unknown command bytes, a message cut short by the next command byte, a
// corrupted report — are discarded and counted. Firmata has no checksum:
// damage that still forms a valid message cannot be told from one.
//
// The zero ReportParser is ready to use.
type ReportParser struct {
	cmd   byte // command of the message being collected (0: none)
	data  [2]byte
	n     int // data bytes collected (sysex: bytes after F0)
	sysex bool

	// Messages counts the good messages; Reports the digital reports among them.
	Messages, Reports uint64
	// Discarded counts the bytes that belonged to no good message.
	Discarded uint64
	// Resyncs counts the stretches of discarded bytes between two good
	// messages.
	Resyncs uint64

	discarding bool
}

// Feed parses data and calls digital(port, levels) for every digital
// report (levels: bit n = pin 8·port+n).
func (p *ReportParser) Feed(data []byte, digital func(port int, levels byte)) {
	for _, c := range data {
		if c&0x80 != 0 {
			p.command(c)
			continue
		}
		switch {
		case p.sysex:
			if p.n++; p.n > MaxSysex {
				p.drop(1 + p.n)
				p.sysex, p.n = false, 0
			}
		case p.cmd == 0:
			p.drop(1)
		default:
			p.data[p.n] = c
			if p.n++; p.n < 2 {
				continue
			}
			cmd := p.cmd
			p.cmd, p.n = 0, 0
			if cmd&0xF0 == DigitalMessage {
				if p.data[1] > 1 {
					p.drop(3)
					continue
				}
				p.good()
				p.Reports++
				digital(int(cmd&0x0F), p.data[0]|p.data[1]<<7)
				continue
			}
			p.good()
		}
	}
}

// command handles a byte with the most significant bit set.
func (p *ReportParser) command(c byte) {
	if c == EndSysex && p.sysex {
		p.sysex, p.n = false, 0
		p.good()
		return
	}
	// A message in progress is cut short.
	switch {
	case p.sysex:
		p.drop(1 + p.n)
		p.sysex = false
	case p.cmd != 0:
		p.drop(1 + p.n)
	}
	p.cmd, p.n = 0, 0
	switch {
	case c&0xF0 == DigitalMessage, c&0xF0 == AnalogMessage, c == ReportVersion:
		p.cmd = c
	case c == StartSysex:
		p.sysex = true
	default:
		p.drop(1) // not something a board sends
	}
}

func (p *ReportParser) drop(n int) {
	p.Discarded += uint64(n)
	if !p.discarding {
		p.discarding = true
		p.Resyncs++
	}
}

func (p *ReportParser) good() {
	p.Messages++
	p.discarding = false
}

// Pending is the number of bytes of an unfinished message.
func (p *ReportParser) Pending() int {
	switch {
	case p.sysex:
		return 1 + p.n
	case p.cmd != 0:
		return 1 + p.n
	}
	return 0
}
