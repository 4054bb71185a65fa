package spikerbox

// Message escapes: device messages are wrapped in these sequences.
var (
	MessageStart = [6]byte{0xFF, 0xFF, 0x01, 0x01, 0x80, 0xFF}
	MessageEnd   = [6]byte{0xFF, 0xFF, 0x01, 0x01, 0x81, 0xFF}
)

// MaxMessage is the longest message body the parser accepts; a message
// whose end sequence does not come within it is abandoned: its start
// sequence is counted as discarded and the bytes after it are parsed again
// as samples, so that a lost end sequence (or garbage that looks like a
// start) cannot swallow the sample stream.
const MaxMessage = 256

// Frame is one sample of every channel.
type Frame struct {
	// Values are the raw ADC values, one per channel, 0..2^bits−1.
	Values []uint16
	// Events has bit n set for every EVNT:n; message (n = 0..63) that
	// arrived since the previous frame.
	Events uint64
	// Skipped is the number of samples lost just before this frame, as
	// far as the bytes tell: when bytes were discarded since the previous
	// frame, as many frames as they would fill, rounded up (a frame cut
	// short, or one with a corrupted byte, is one lost sample). The
	// protocol has no sample counter: frames lost whole are not seen, and
	// garbage inserted between frames counts as lost samples too.
	Skipped uint64
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
// and its bytes counted as discarded; Frame.Skipped tells the next frame
// how many samples the discarded bytes held.
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
	since  uint64 // bytes discarded since the last frame
	replay [MaxMessage + 6]byte

	// Discarded counts bytes dropped while resynchronising.
	Discarded uint64
	// Resyncs counts the stretches of discarded bytes between two frames:
	// each time the parser lost the frame boundary and found it again.
	Resyncs uint64
	// Skipped counts the samples reported lost in Frame.Skipped.
	Skipped uint64
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

// byte parses one byte.
func (p *Parser) byte(c byte, frame func(*Frame), msg func(key, value []byte)) {
	if p.escN == 0 && !p.inMsg && c != 0xFF {
		p.frameByte(c, frame)
		return
	}
	p.escByte(c, frame, msg)
}

// discard counts n bytes dropped.
func (p *Parser) discard(n int) {
	if p.since == 0 {
		p.Resyncs++
	}
	p.since += uint64(n)
	p.Discarded += uint64(n)
}

func (p *Parser) escByte(c byte, frame func(*Frame), msg func(key, value []byte)) {
	if p.inMsg {
		if p.msgN == len(p.msg) {
			// No end sequence in time: abandon the message. Its start
			// sequence was garbage; what followed goes back to framing
			// (a nested message start in it cannot be abandoned before
			// the replay ends: it has fewer than MaxMessage bytes left).
			p.discard(len(MessageStart))
			p.Abandoned++
			p.inMsg = false
			n := copy(p.replay[:], p.msg[:p.msgN])
			p.msgN = 0
			p.Feed(p.replay[:n], frame, msg)
			p.byte(c, frame, msg)
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
			p.discard(p.fn)
			p.BrokenFrames++
		}
		if c&0x7F > p.maxHigh {
			p.discard(1)
			p.fn = 0
			return
		}
		p.fb[0] = c & 0x7F
		p.fn = 1
	} else {
		if p.fn == 0 {
			p.discard(1)
			return
		}
		if p.fn%2 == 0 && c > p.maxHigh {
			p.discard(p.fn + 1)
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
		p.frame.Skipped = 0
		if p.Frames > 0 && p.since > 0 {
			fl := uint64(len(p.fb))
			p.frame.Skipped = (p.since + fl - 1) / fl
			p.Skipped += p.frame.Skipped
		}
		p.since = 0
		p.events = 0
		p.fn = 0
		p.Frames++
		frame(&p.frame)
	}
}
