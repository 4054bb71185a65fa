package playback

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"
)

// npyArray is a one-dimensional little-endian numpy array read from a .npy
// file, either mapped into memory (large files) or read whole.
type npyArray struct {
	path  string
	descr string // "<i8", "<i2", "|u1", "|S16", …
	kind  byte   // 'i' signed, 'u' unsigned, 'f' float, 'S' bytes
	size  int    // bytes per element
	shape []int
	count int    // elements: the product of shape
	data  []byte // count*size bytes
	mmap  []byte // the whole mapping, when mapped
}

// openNpy opens a .npy file. With mapped it maps the file instead of
// reading it, for arrays too large to hold in memory.
func openNpy(path string, mapped bool) (*npyArray, error) {
	var buf, m []byte
	var err error
	if mapped {
		m, err = mapFile(path)
		buf = m
	} else {
		buf, err = os.ReadFile(path)
	}
	if err != nil {
		return nil, err
	}
	a, err := parseNpy(path, buf)
	if err != nil {
		if m != nil {
			syscall.Munmap(m)
		}
		return nil, err
	}
	a.mmap = m
	return a, nil
}

// close unmaps a mapped array.
func (a *npyArray) close() {
	if a != nil && a.mmap != nil {
		syscall.Munmap(a.mmap)
		a.mmap = nil
		a.data = nil
	}
}

// mapFile maps a whole file read-only. An empty file gives no mapping.
func mapFile(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	size := st.Size()
	if size == 0 {
		return nil, nil
	}
	if int64(int(size)) != size {
		return nil, fmt.Errorf("%s: %d bytes is too large to map", path, size)
	}
	m, err := syscall.Mmap(int(f.Fd()), 0, int(size), syscall.PROT_READ, syscall.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("%s: mmap: %w", path, err)
	}
	return m, nil
}

const npyMagic = "\x93NUMPY"

// parseNpy reads the header of a .npy file held in buf (format versions
// 1.0, 2.0 and 3.0) and checks that the data is all there.
func parseNpy(path string, buf []byte) (*npyArray, error) {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%s: %s", path, fmt.Sprintf(format, args...))
	}
	if len(buf) < 10 || string(buf[:6]) != npyMagic {
		return nil, bad("not a .npy file (it does not start with \\x93NUMPY)")
	}
	major, minor := buf[6], buf[7]
	var hlen, start int
	switch major {
	case 1:
		hlen, start = int(binary.LittleEndian.Uint16(buf[8:10])), 10
	case 2, 3:
		if len(buf) < 12 {
			return nil, bad("truncated .npy header")
		}
		h := binary.LittleEndian.Uint32(buf[8:12])
		if uint64(h) > uint64(len(buf)) {
			return nil, bad(".npy header length %d runs past the end of the %d-byte file", h, len(buf))
		}
		hlen, start = int(h), 12
	default:
		return nil, bad(".npy format version %d.%d is not supported (1.0, 2.0 and 3.0 are)", major, minor)
	}
	if start+hlen > len(buf) {
		return nil, bad(".npy header length %d runs past the end of the %d-byte file", hlen, len(buf))
	}
	header := string(buf[start : start+hlen])
	fields, err := parsePyDict(header)
	if err != nil {
		return nil, bad("malformed .npy header %q: %v", strings.TrimSpace(header), err)
	}
	a := &npyArray{path: path}

	descr, ok := fields["descr"].(string)
	if !ok {
		if _, isList := fields["descr"].([]any); isList {
			return nil, bad("structured .npy arrays are not supported (descr %v)", fields["descr"])
		}
		return nil, bad(".npy header has no 'descr' string: %q", strings.TrimSpace(header))
	}
	if err := a.setDescr(descr); err != nil {
		return nil, bad("%v", err)
	}
	if fo, ok := fields["fortran_order"].(bool); !ok {
		return nil, bad(".npy header has no 'fortran_order' True/False: %q", strings.TrimSpace(header))
	} else if fo {
		return nil, bad("Fortran-ordered .npy arrays are not supported")
	}
	shape, ok := fields["shape"].([]any)
	if !ok {
		return nil, bad(".npy header has no 'shape' tuple: %q", strings.TrimSpace(header))
	}
	a.count = 1
	for i, d := range shape {
		n, ok := d.(int64)
		if !ok || n < 0 {
			return nil, bad(".npy shape %v: dimension %d is not a non-negative integer", shape, i)
		}
		if n > int64(len(buf)) {
			return nil, bad("truncated: the header says shape %v, the file holds %d bytes", shape, len(buf))
		}
		if i > 0 && n != 1 {
			return nil, bad(".npy shape %v: only one-dimensional arrays (or (N, 1)) are supported", shape)
		}
		a.shape = append(a.shape, int(n))
		a.count *= int(n)
	}
	data := buf[start+hlen:]
	need := uint64(a.count) * uint64(a.size)
	if need > uint64(len(data)) {
		return nil, bad("truncated: the header says %d values of %d bytes, the file holds %d bytes of data", a.count, a.size, len(data))
	}
	a.data = data[:need]
	return a, nil
}

// setDescr checks the dtype string: little-endian (or single-byte)
// integers, floats and byte strings.
func (a *npyArray) setDescr(d string) error {
	if len(d) < 3 {
		return fmt.Errorf("dtype %q is not supported", d)
	}
	order, kind, sizeStr := d[0], d[1], d[2:]
	size, err := strconv.Atoi(sizeStr)
	if err != nil || size < 1 {
		return fmt.Errorf("dtype %q is not supported", d)
	}
	switch kind {
	case 'i', 'u':
		if size != 1 && size != 2 && size != 4 && size != 8 {
			return fmt.Errorf("dtype %q is not supported", d)
		}
	case 'f':
		if size != 4 && size != 8 {
			return fmt.Errorf("dtype %q is not supported", d)
		}
	case 'S':
	default:
		return fmt.Errorf("dtype %q is not supported (integers, floats and byte strings are)", d)
	}
	switch {
	case order == '<':
	case order == '|' && (size == 1 || kind == 'S'):
	case order == '>' && (size == 1 || kind == 'S'):
	case order == '>':
		return fmt.Errorf("dtype %q is big-endian; only little-endian arrays are supported", d)
	default:
		return fmt.Errorf("dtype %q is not supported", d)
	}
	a.descr, a.kind, a.size = d, kind, size
	return nil
}

// isInt reports whether the array holds integers.
func (a *npyArray) isInt() bool { return a.kind == 'i' || a.kind == 'u' }

// int64At returns element i of an integer array.
func (a *npyArray) int64At(i int) int64 {
	switch a.size {
	case 8:
		return int64(binary.LittleEndian.Uint64(a.data[i*8:]))
	case 4:
		v := binary.LittleEndian.Uint32(a.data[i*4:])
		if a.kind == 'i' {
			return int64(int32(v))
		}
		return int64(v)
	case 2:
		v := binary.LittleEndian.Uint16(a.data[i*2:])
		if a.kind == 'i' {
			return int64(int16(v))
		}
		return int64(v)
	default:
		if a.kind == 'i' {
			return int64(int8(a.data[i]))
		}
		return int64(a.data[i])
	}
}

// ints returns a copy of an integer array.
func (a *npyArray) ints() ([]int64, error) {
	if !a.isInt() {
		return nil, fmt.Errorf("%s: holds %s values, want integers", a.path, a.descr)
	}
	out := make([]int64, a.count)
	for i := range out {
		out[i] = a.int64At(i)
	}
	return out, nil
}

// parsePyDict parses the Python dict literal of a .npy header: string
// keys; values that are strings, True/False/None, integers, or tuples and
// lists of those.
func parsePyDict(s string) (map[string]any, error) {
	p := &pyParser{s: s}
	v, err := p.value()
	if err != nil {
		return nil, err
	}
	p.space()
	if p.i != len(p.s) {
		return nil, fmt.Errorf("unexpected %q after the dict", p.rest())
	}
	d, ok := v.(map[string]any)
	if !ok {
		return nil, errors.New("not a dict")
	}
	return d, nil
}

type pyParser struct {
	s string
	i int
}

func (p *pyParser) space() {
	for p.i < len(p.s) && strings.IndexByte(" \t\r\n", p.s[p.i]) >= 0 {
		p.i++
	}
}

func (p *pyParser) rest() string {
	r := p.s[p.i:]
	if len(r) > 20 {
		r = r[:20] + "…"
	}
	return r
}

func (p *pyParser) value() (any, error) {
	p.space()
	if p.i >= len(p.s) {
		return nil, errors.New("unexpected end")
	}
	switch c := p.s[p.i]; {
	case c == '{':
		p.i++
		d := map[string]any{}
		for {
			p.space()
			if p.i < len(p.s) && p.s[p.i] == '}' {
				p.i++
				return d, nil
			}
			k, err := p.value()
			if err != nil {
				return nil, err
			}
			key, ok := k.(string)
			if !ok {
				return nil, fmt.Errorf("dict key %v is not a string", k)
			}
			p.space()
			if p.i >= len(p.s) || p.s[p.i] != ':' {
				return nil, fmt.Errorf("expected ':' after key %q", key)
			}
			p.i++
			v, err := p.value()
			if err != nil {
				return nil, err
			}
			d[key] = v
			p.space()
			if p.i < len(p.s) && p.s[p.i] == ',' {
				p.i++
			} else if p.i >= len(p.s) || p.s[p.i] != '}' {
				return nil, fmt.Errorf("expected ',' or '}' at %q", p.rest())
			}
		}
	case c == '(' || c == '[':
		end := byte(')')
		if c == '[' {
			end = ']'
		}
		p.i++
		var items []any
		for {
			p.space()
			if p.i < len(p.s) && p.s[p.i] == end {
				p.i++
				if items == nil {
					items = []any{}
				}
				return items, nil
			}
			v, err := p.value()
			if err != nil {
				return nil, err
			}
			items = append(items, v)
			p.space()
			if p.i < len(p.s) && p.s[p.i] == ',' {
				p.i++
			} else if p.i >= len(p.s) || p.s[p.i] != end {
				return nil, fmt.Errorf("expected ',' or %q at %q", end, p.rest())
			}
		}
	case c == '\'' || c == '"':
		j := strings.IndexByte(p.s[p.i+1:], c)
		if j < 0 {
			return nil, errors.New("unterminated string")
		}
		v := p.s[p.i+1 : p.i+1+j]
		p.i += j + 2
		return v, nil
	case c == '-' || c >= '0' && c <= '9':
		j := p.i + 1
		for j < len(p.s) && p.s[j] >= '0' && p.s[j] <= '9' {
			j++
		}
		n, err := strconv.ParseInt(p.s[p.i:j], 10, 64)
		if err != nil {
			return nil, fmt.Errorf("bad integer %q", p.s[p.i:j])
		}
		if j < len(p.s) && p.s[j] == 'L' { // Python 2 long
			j++
		}
		p.i = j
		return n, nil
	default:
		for _, w := range []struct {
			word string
			v    any
		}{{"True", true}, {"False", false}, {"None", nil}} {
			if strings.HasPrefix(p.s[p.i:], w.word) {
				p.i += len(w.word)
				return w.v, nil
			}
		}
		return nil, fmt.Errorf("unexpected %q", p.rest())
	}
}

// unmap releases a mapping made by mapFile.
func unmap(m []byte) error { return syscall.Munmap(m) }
