package openbci

// PacketLen is the length of one Cyton packet on the wire.
const PacketLen = 33

// Packet framing bytes.
const (
	StartByte   = 0xA0
	StopByteMin = 0xC0 // accelerometer in the aux bytes
	StopByteMax = 0xC6
)

// Packet is one decoded 33-byte Cyton packet:
// A0 | sample number | 8 × int24 BE | 6 aux bytes | stop byte C0–C6.
type Packet struct {
	SampleNumber uint8    // the board's 0–255 wrapping packet counter
	Counts       [8]int32 // ADC counts, sign-extended from 24 bits
	Aux          [6]byte  // meaning depends on Stop (C0: 3 × int16 BE accelerometer)
	Stop         byte     // C0–C6
}

// Parser splits a Cyton byte stream into packets. It does no I/O: feed it
// bytes as they arrive, in any split; the packets it emits depend only on
// the bytes, never on how they were cut.
//
// A candidate packet starts at an A0 byte. Its stop byte (offset 32) must be
// C0–C6, or the candidate is rejected and the scan resumes at the next A0
// after its start (A0 also occurs inside sample data, so every candidate is
// tried). A candidate with a valid stop byte is accepted at once when its
// sample counter follows the last accepted packet's — the steady state —
// and otherwise (the first packet, the first after a lost one, a candidate
// that starts inside garbage) only when the byte after it is A0, the next
// packet's start. That keeps garbage holding an A0 and a plausible stop
// byte 32 bytes later from swallowing the real packet that follows it, at
// the cost of holding such a packet until one more byte arrives (4 ms at
// 250 Hz). A well-formed candidate rejected for want of confirmation still
// confirms a next packet whose counter follows its own. Garbage that is itself a well-formed packet with the expected
// counter cannot be told from a real one.
//
// The zero Parser is ready to use.
type Parser struct {
	buf      [PacketLen + 1]byte
	n        int
	haveLast bool
	last     uint8 // counter of the last accepted packet
	haveTent bool
	tent     uint8 // counter of the last well-formed candidate rejected for want of confirmation
	pkt      Packet

	// Discarded counts the bytes dropped while looking for packets.
	Discarded uint64
	// Resyncs counts the stretches of discarded bytes between two packets:
	// each time the parser lost the packet boundary (garbage, a truncated
	// or corrupted packet) and looked for the next good packet.
	Resyncs uint64
	// Packets counts the packets emitted.
	Packets uint64

	discarding bool // in a stretch of discarded bytes
}

// Reset forgets any partial packet and the sync state (not the counters).
func (p *Parser) Reset() {
	p.n = 0
	p.haveLast = false
	p.haveTent = false
}

// Feed parses data and calls emit for every complete packet. The *Packet is
// valid only during the call.
func (p *Parser) Feed(data []byte, emit func(*Packet)) {
	for len(data) > 0 {
		// Fast path: nothing pending, a whole valid packet in data with the
		// expected counter.
		if p.n == 0 && len(data) >= PacketLen && data[0] == StartByte && p.follows(data[1]) &&
			data[PacketLen-1] >= StopByteMin && data[PacketLen-1] <= StopByteMax {
			p.accept(data[:PacketLen], emit)
			data = data[PacketLen:]
			continue
		}
		c := data[0]
		data = data[1:]
		if p.n == 0 && c != StartByte {
			p.discard(1)
			continue
		}
		p.buf[p.n] = c
		p.n++
		p.settle(emit)
	}
}

// settle decides about the candidate in buf once it is long enough.
func (p *Parser) settle(emit func(*Packet)) {
	for p.n >= PacketLen {
		stop := p.buf[PacketLen-1]
		if stop >= StopByteMin && stop <= StopByteMax {
			if p.follows(p.buf[1]) {
				p.accept(p.buf[:PacketLen], emit)
				p.shift(PacketLen)
				return
			}
			if p.n == PacketLen {
				return // wait for the byte after it
			}
			if p.buf[PacketLen] == StartByte {
				p.accept(p.buf[:PacketLen], emit)
				p.shift(PacketLen)
				return
			}
			p.tent, p.haveTent = p.buf[1], true
		}
		// Reject: resume at the next A0 after the candidate's start.
		k := 1
		for k < p.n && p.buf[k] != StartByte {
			k++
		}
		p.discard(k)
		p.shift(k)
	}
}

// discard counts k bytes dropped.
func (p *Parser) discard(k int) {
	p.Discarded += uint64(k)
	if !p.discarding {
		p.discarding = true
		p.Resyncs++
	}
}

// follows reports whether counter c follows the last accepted packet, or
// the last well-formed candidate that was rejected for want of
// confirmation (so that a stream with garbage after every packet loses one
// packet, not all).
func (p *Parser) follows(c uint8) bool {
	return (p.haveLast && c == p.last+1) || (p.haveTent && c == p.tent+1)
}

// shift drops the first k bytes of buf.
func (p *Parser) shift(k int) {
	copy(p.buf[:], p.buf[k:p.n])
	p.n -= k
}

func (p *Parser) accept(b []byte, emit func(*Packet)) {
	b = b[:PacketLen]
	pk := &p.pkt
	pk.SampleNumber = b[1]
	for ch := 0; ch < 8; ch++ {
		o := 2 + 3*ch
		pk.Counts[ch] = int32(uint32(b[o])<<24|uint32(b[o+1])<<16|uint32(b[o+2])<<8) >> 8
	}
	copy(pk.Aux[:], b[26:32])
	pk.Stop = b[32]
	p.haveLast = true
	p.haveTent = false
	p.last = b[1]
	p.discarding = false
	p.Packets++
	emit(pk)
}
