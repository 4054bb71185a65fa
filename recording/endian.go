package recording

import "unsafe"

// The recorder writes int16 samples straight into its file buffers, which
// are little-endian as Open Ephys files are: refuse to run where that would
// be wrong.
func init() {
	x := uint16(1)
	if *(*byte)(unsafe.Pointer(&x)) != 1 {
		panic("recording: ephysd supports little-endian hosts only (Open Ephys files are little-endian)")
	}
}
