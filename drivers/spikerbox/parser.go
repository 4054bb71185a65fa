package spikerbox

// Message escapes: device messages are wrapped in these sequences.
var (
	MessageStart = [6]byte{0xFF, 0xFF, 0x01, 0x01, 0x80, 0xFF}
	MessageEnd   = [6]byte{0xFF, 0xFF, 0x01, 0x01, 0x81, 0xFF}
)

// MaxMessage is the longest message body the parser accepts; a message
// whose end sequence does not come within it is abandoned (its bytes are
// counted as discarded) so that a lost end sequence cannot swallow the
// sample stream.
const MaxMessage = 256

// Frame is one sample of every channel.
type Frame struct {
	// Values are the raw ADC values, one per channel, 0..2^bits−1.
	Values []uint16
	// Events has bit n set for every EVNT:n; message (n = 0..63) that
	// arrived since the previous frame.
	Events uint64
}

// Parser splits a SpikerBox byte stream into frames and device messages.
// It does no I/O: feed it bytes as they arrive, in any split; what it emits
// depends only on the bytes, never on how they were cut.
//
// Message blocks (MessageStart … MessageEnd, holding key:value; pairs) are
// taken out of the stream wherever they occur, even inside a frame, before
// framing. Framing: the first byte of a frame has its most significant bit
// set, every other byte has it clear; each sample is two bytes, the high
// bits (7 at most) then the low 7 bits. A frame that is cut short by a new
// frame start, or that holds a value outside the ADC's range, is dropped
// and its bytes counted as discarded.
type Parser struct {
	nch     int
	maxHigh byte // largest valid high byte (without the frame flag)

	esc  [6]byte // bytes that may be the start of a message
	escN int

	inMsg bool
	msg   [MaxMessage + 6]byte
	msgN  int

	fb     []byte // the frame being collected
	fn     int
	frame  Frame
	events uint64

	// Discarded counts bytes dropped while resynchronising.
	Discarded uint64
	// BrokenFrames counts frames started but dropped.
	BrokenFrames uint64
	// Frames counts frames emitted.
	Frames uint64
	// Messages counts complete message blocks; Abandoned those dropped
	// for want of an end sequence.
	Messages, Abandoned uint64
}

// NewParser makes a parser for frames of channels samples of bits bits
// (1–14).
func NewParser(channels, bits int) *Parser {
	return &Parser{
		nch:     channels,
		maxHigh: byte((int(1)<<bits - 1) >> 7),
		fb:      make([]byte, 2*channels),
		frame:   Frame{Values: make([]uint16, channels)},
	}
}

// Feed parses data. It calls frame for every complete frame and, when msg
// is not nil, msg for every key:value pair of every message (EVNT too).
// The arguments are valid only during the call.
func (p *Parser) Feed(data []byte, frame func(*Frame), msg func(key, value []byte)) {
	for _, c := range data {
		if p.escN == 0 && !p.inMsg && c != 0xFF {
			p.frameByte(c, frame)
			continue
		}
		p.escByte(c, frame, msg)
	}
}

func (p *Parser) escByte(c byte, frame func(*Frame), msg func(key, value []byte)) {
	if p.inMsg {
		if p.msgN == len(p.msg) {
			// No end sequence in time: abandon the message.
			p.Discarded += uint64(len(MessageStart) + p.msgN)
			p.Abandoned++
			p.inMsg = false
			p.msgN = 0
			p.Feed([]byte{c}, frame, msg)
			return
		}
		p.msg[p.msgN] = c
		p.msgN++
		if p.msgN >= len(MessageEnd) && [6]byte(p.msg[p.msgN-6:p.msgN]) == MessageEnd {
			p.inMsg = false
			p.Messages++
			p.message(p.msg[:p.msgN-6], msg)
			p.msgN = 0
		}
		return
	}
	p.esc[p.escN] = c
	p.escN++
	if c == MessageStart[p.escN-1] {
		if p.escN == len(MessageStart) {
			p.escN = 0
			p.inMsg = true
			p.msgN = 0
		}
		return
	}
	// Not a message start: the first held byte is data; the rest may still
	// begin one.
	held := p.esc
	n := p.escN
	p.escN = 0
	p.frameByte(held[0], frame)
	for _, b := range held[1:n] {
		if p.escN == 0 && b != 0xFF {
			p.frameByte(b, frame)
			continue
		}
		p.escByte(b, frame, msg)
	}
}

// message handles the body of one message: key:value; pairs.
func (p *Parser) message(body []byte, msg func(key, value []byte)) {
	for len(body) > 0 {
		end := 0
		for end < len(body) && body[end] != ';' {
			end++
		}
		pair := body[:end]
		if end < len(body) {
			end++
		}
		body = body[end:]
		colon := 0
		for colon < len(pair) && pair[colon] != ':' {
			colon++
		}
		if colon == len(pair) {
			continue
		}
		key, value := pair[:colon], pair[colon+1:]
		if string(key) == "EVNT" {
			if n, ok := eventNumber(value); ok {
				p.events |= 1 << n
			}
		}
		if msg != nil {
			msg(key, value)
		}
	}
}

// eventNumber parses the n of EVNT:n (0–63).
func eventNumber(v []byte) (uint, bool) {
	if len(v) == 0 || len(v) > 2 {
		return 0, false
	}
	n := uint(0)
	for _, c := range v {
		if c < '0' || c > '9' {
			return 0, false
		}
		n = n*10 + uint(c-'0')
	}
	return n, n < 64
}

func (p *Parser) frameByte(c byte, frame func(*Frame)) {
	if c&0x80 != 0 {
		if p.fn > 0 {
			p.Discarded += uint64(p.fn)
			p.BrokenFrames++
		}
		if c&0x7F > p.maxHigh {
			p.Discarded++
			p.fn = 0
			return
		}
		p.fb[0] = c & 0x7F
		p.fn = 1
	} else {
		if p.fn == 0 {
			p.Discarded++
			return
		}
		if p.fn%2 == 0 && c > p.maxHigh {
			p.Discarded += uint64(p.fn + 1)
			p.BrokenFrames++
			p.fn = 0
			return
		}
		p.fb[p.fn] = c
		p.fn++
	}
	if p.fn == len(p.fb) {
		for ch := range p.frame.Values {
			p.frame.Values[ch] = uint16(p.fb[2*ch])<<7 | uint16(p.fb[2*ch+1])
		}
		p.frame.Events = p.events
		p.events = 0
		p.fn = 0
		p.Frames++
		frame(&p.frame)
	}
}
