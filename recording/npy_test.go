package recording

import (
	"encoding/binary"
	"math"
	"os"
	"path/filepath"
	"testing"
)

func TestNpyHeaderSize(t *testing.T) {
	for _, descr := range []string{"<i2", "<i8", "<f8", "<u8", "|S1", "|S12345"} {
		size := npyHeaderSize(descr)
		if size%64 != 0 {
			t.Errorf("%s: header size %d is not a multiple of 64", descr, size)
		}
		for _, count := range []int64{0, 1, 12345, math.MaxInt64} {
			h := appendNpyHeader(nil, size, descr, count)
			if len(h) != size {
				t.Errorf("%s count %d: header is %d bytes, want %d", descr, count, len(h), size)
			}
			if got := int(binary.LittleEndian.Uint16(h[8:])); got != size-10 {
				t.Errorf("%s: HEADER_LEN %d, want %d", descr, got, size-10)
			}
			if h[len(h)-1] != '\n' {
				t.Errorf("%s: header does not end in a newline", descr)
			}
		}
	}
}

func TestNpyHeaderNoAlloc(t *testing.T) {
	size := npyHeaderSize("<i8")
	buf := make([]byte, 0, size)
	allocs := testing.AllocsPerRun(100, func() {
		buf = appendNpyHeader(buf[:0], size, "<i8", 1234567890123)
	})
	if allocs != 0 {
		t.Errorf("appendNpyHeader allocates %v times", allocs)
	}
}

// TestNpyRoundTrip writes .npy files the way the recorder does (header
// written at creation, records, in-place header update, and records written
// after the last header update that the header must not claim), and loads
// them with numpy.
func TestNpyRoundTrip(t *testing.T) {
	dir := t.TempDir()
	i64 := filepath.Join(dir, "i64.npy")
	f, err := newRecordFile(i64, "<i8", 8, 4, false)
	if err != nil {
		t.Fatal(err)
	}
	for i := int64(0); i < 10; i++ { // buffer of 4: flushes on its own
		p, err := f.next(1)
		if err != nil {
			t.Fatal(err)
		}
		binary.LittleEndian.PutUint64(p, uint64(i*1000-3))
	}
	if err := f.flush(); err != nil {
		t.Fatal(err)
	}
	if err := f.writeHeader(); err != nil {
		t.Fatal(err)
	}
	// Records that reach the file after the header update: not claimed.
	p, _ := f.next(2)
	binary.LittleEndian.PutUint64(p, 77)
	binary.LittleEndian.PutUint64(p[8:], 78)
	if err := f.flush(); err != nil {
		t.Fatal(err)
	}
	f.abandon()

	i16 := filepath.Join(dir, "i16.npy")
	g, err := newRecordFile(i16, "<i2", 2, 1, true)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(i16); !os.IsNotExist(err) {
		t.Fatalf("lazy file exists before its first flush: %v", err)
	}
	for _, v := range []int16{1, -1, 2, -2, 64, -64} {
		p, _ := g.next(1)
		binary.LittleEndian.PutUint16(p, uint16(v))
	}
	if err := g.flush(); err != nil {
		t.Fatal(err)
	}
	if err := g.writeHeader(); err != nil {
		t.Fatal(err)
	}
	if err := g.close(); err != nil {
		t.Fatal(err)
	}

	f64 := filepath.Join(dir, "f64.npy")
	h, err := newRecordFile(f64, "<f8", 8, 16, false)
	if err != nil {
		t.Fatal(err)
	}
	if err := h.close(); err != nil { // an empty array
		t.Fatal(err)
	}

	text := filepath.Join(dir, "text.npy")
	if err := writeFileAtomic(text, npyBytes("|S5", 2, []byte("hello"+"hi\x00\x00\x00"))); err != nil {
		t.Fatal(err)
	}

	const script = `
import sys, json, numpy as np
out = {}
for name in sys.argv[1:]:
    raw = open(name, 'rb').read()
    a = np.load(name)
    m = np.load(name, mmap_mode='r')
    vals = [x.decode() if isinstance(x, bytes) else x for x in a.tolist()]
    out[name.rsplit('/', 1)[1]] = {'dtype': a.dtype.str, 'shape': list(a.shape), 'values': vals,
        'mmap_len': len(m), 'data_offset': m.offset, 'file_size': len(raw)}
print(json.dumps(out))
`
	var got map[string]struct {
		Dtype      string
		Shape      []int
		Values     []any
		MmapLen    int `json:"mmap_len"`
		DataOffset int `json:"data_offset"`
	}
	runPython(t, script, &got, i64, i16, f64, text)

	check := func(name, dtype string, want []any) {
		t.Helper()
		g := got[name]
		if g.Dtype != dtype || len(g.Shape) != 1 || g.Shape[0] != len(want) || g.MmapLen != len(want) {
			t.Errorf("%s: numpy sees dtype %s shape %v (mmap %d), want %s (%d,)", name, g.Dtype, g.Shape, g.MmapLen, dtype, len(want))
			return
		}
		if g.DataOffset%64 != 0 {
			t.Errorf("%s: data starts at byte %d, not a multiple of 64", name, g.DataOffset)
		}
		for i := range want {
			if g.Values[i] != want[i] {
				t.Errorf("%s[%d] = %v, want %v", name, i, g.Values[i], want[i])
			}
		}
	}
	var want64 []any
	for i := 0; i < 10; i++ {
		want64 = append(want64, float64(i*1000-3)) // JSON numbers
	}
	check("i64.npy", "<i8", want64)
	check("i16.npy", "<i2", []any{1.0, -1.0, 2.0, -2.0, 64.0, -64.0})
	check("f64.npy", "<f8", nil)
	check("text.npy", "|S5", []any{"hello", "hi"})
}
