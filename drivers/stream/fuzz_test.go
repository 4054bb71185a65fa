package stream

import (
	"bytes"
	"fmt"
	"hash/fnv"
	"math/rand/v2"
	"testing"
)

// fuzzLayout derives a small layout from a control byte.
func fuzzLayout(ctl byte) Layout {
	return Layout{Channels: 1 + int(ctl&7), Format: Format(1 + (ctl>>3)%3), DigitalBytes: []int{0, 1, 2, 4, 8}[int(ctl>>5)%5], MaxSamples: 16}
}

// decodeAll feeds input to a decoder in the given chunk sizes (cycled) and
// describes everything it produced, checking that every DATA sample has
// exactly the layout's channel count.
func decodeAll(t *testing.T, lay Layout, input []byte, chunks []int) string {
	d := NewDecoder(lay.MaxPayload() + 64)
	var out bytes.Buffer
	scale := make([]float32, lay.Channels)
	for c := range scale {
		scale[c] = 1
	}
	vals := make([]float32, lay.Channels*lay.MaxSamples)
	dig := make([]uint64, lay.MaxSamples)
	for k := 0; len(input) > 0; k++ {
		n := min(len(input), chunks[k%len(chunks)])
		p := input[:n]
		input = input[n:]
		for len(p) > 0 {
			took := d.Feed(p)
			p = p[took:]
			for {
				f, ok := d.Next()
				if !ok {
					break
				}
				h := fnv.New64a()
				h.Write(f.Payload)
				fmt.Fprintf(&out, "frame %02x %d %x\n", f.Type, len(f.Payload), h.Sum64())
				switch f.Type {
				case TypeData:
					dd, err := lay.Data(f.Payload)
					if err != nil {
						fmt.Fprintf(&out, " malformed\n")
						continue
					}
					if dd.Samples < 1 || dd.Samples > lay.MaxSamples || dd.Samples*lay.SampleBytes() != len(f.Payload)-8 {
						t.Fatalf("DATA frame of %d bytes gives %d samples of %d bytes", len(f.Payload), dd.Samples, lay.SampleBytes())
					}
					dd.Scale(0, dd.Samples, vals, dd.Samples, 0, scale, dig)
					for i := 0; i < dd.Samples; i++ {
						row := make([]int32, 0, lay.Channels)
						for c := 0; c < lay.Channels; c++ {
							row = append(row, dd.Value(i, c))
							if float32(dd.Value(i, c)) != vals[c*dd.Samples+i] {
								t.Fatalf("Scale and Value disagree at sample %d channel %d", i, c)
							}
						}
						if len(row) != lay.Channels {
							t.Fatalf("sample with %d channels, want %d", len(row), lay.Channels)
						}
						if dig[i] != dd.Digital(i) {
							t.Fatalf("Scale and Digital disagree at sample %d", i)
						}
						fmt.Fprintf(&out, " %d %v %x\n", dd.First+uint64(i), row, dig[i])
					}
				case TypeAnnounce:
					a, err := ParseAnnounce(f.Payload)
					fmt.Fprintf(&out, " announce %v %v\n", a.Channels, err)
				case TypeError:
					e, err := ParseError(f.Payload)
					if err == nil {
						fmt.Fprintf(&out, " error %d %x %q\n", e.Code, e.Data, e.Text)
					}
				case TypeHello:
					v, err := ParseHello(f.Payload)
					fmt.Fprintf(&out, " hello %v %v\n", v, err)
				}
			}
		}
	}
	st := d.Stats()
	if st.Resyncs > st.Discarded || (st.Discarded > 0) != (st.Resyncs > 0) || st.Resyncs > st.Frames+1 {
		t.Fatalf("%d resyncs for %d discarded bytes and %d frames", st.Resyncs, st.Discarded, st.Frames)
	}
	fmt.Fprintf(&out, "stats %+v buffered %d\n", st, d.Buffered())
	return out.String()
}

// FuzzStreamDecoder checks that the decoder never panics, that the way the
// input is cut into Feed calls changes nothing, and that every sample it
// yields has the layout's channel count.
func FuzzStreamDecoder(f *testing.F) {
	for _, s := range []string{docHello, docStart, docAnnounce, docData, docError, docLog} {
		f.Add(append([]byte{0x0b, 7}, unhex(f, s)...))
	}
	r := rand.New(rand.NewPCG(3, 4))
	for ctl := 0; ctl < 8; ctl++ {
		lay := fuzzLayout(byte(ctl * 37))
		a := Announce{Version: 1, Format: lay.Format, DigitalBytes: lay.DigitalBytes, Channels: lay.Channels, MaxSamples: lay.MaxSamples, RateMilliHz: 1000, ScaleUV: 1}
		e, err := NewEncoder(a)
		if err != nil {
			f.Fatal(err)
		}
		in := []byte{byte(ctl * 37), byte(ctl)}
		in = append(in, 0xEB, 0x90, 0x82, 0x00, 0xEB)
		for k := 0; k < 3; k++ {
			_, _, samples, digital := randomFrame(r, a)
			in, _ = e.AppendData(in, uint64(k*16), samples, digital)
			if k == 1 {
				in[len(in)-9] ^= 0x10
			}
		}
		f.Add(in)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) < 2 {
			return
		}
		lay := fuzzLayout(data[0])
		r := rand.New(rand.NewPCG(uint64(data[1]), 0))
		input := data[2:]
		whole := decodeAll(t, lay, input, []int{len(input) + 1})
		cuts := make([]int, 1+r.IntN(8))
		for i := range cuts {
			cuts[i] = 1 + r.IntN(max(1, len(input)/2))
		}
		if data[1]&1 == 1 {
			cuts = []int{1}
		}
		split := decodeAll(t, lay, input, cuts)
		if whole != split {
			t.Fatalf("cut into %v the input decodes differently:\nwhole:\n%s\nsplit:\n%s", cuts, whole, split)
		}
	})
}
