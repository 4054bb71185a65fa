package playback

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
)

// oebin is the part of structure.oebin that playback reads. Unknown fields
// are ignored.
type oebin struct {
	GUIVersion string            `json:"GUI version"`
	Continuous []oebinContinuous `json:"continuous"`
	Events     []oebinEvents     `json:"events"`
}

type oebinContinuous struct {
	FolderName          string         `json:"folder_name"`
	SampleRate          float64        `json:"sample_rate"`
	SourceProcessorName string         `json:"source_processor_name"`
	SourceProcessorID   flexInt        `json:"source_processor_id"`
	StreamName          string         `json:"stream_name"`
	NumChannels         flexInt        `json:"num_channels"`
	Channels            []oebinChannel `json:"channels"`
}

type oebinChannel struct {
	ChannelName string  `json:"channel_name"`
	Description string  `json:"description"`
	BitVolts    float64 `json:"bit_volts"`
	Units       string  `json:"units"`
}

type oebinEvents struct {
	FolderName   string  `json:"folder_name"`
	ChannelName  string  `json:"channel_name"`
	Type         string  `json:"type"`
	InitialState flexInt `json:"initial_state"`
}

// flexInt is an integer that some writers put in quotes.
type flexInt int64

func (f *flexInt) UnmarshalJSON(b []byte) error {
	b = bytes.Trim(b, `"`)
	if string(b) == "null" || len(b) == 0 {
		*f = 0
		return nil
	}
	n, err := strconv.ParseInt(string(b), 10, 64)
	if err != nil {
		x, ferr := strconv.ParseFloat(string(b), 64)
		if ferr != nil || x != float64(int64(x)) {
			return fmt.Errorf("%s is not an integer", b)
		}
		n = int64(x)
	}
	*f = flexInt(n)
	return nil
}

// folder is a folder name from structure.oebin without its trailing slash.
func folder(name string) string { return strings.TrimRight(name, "/") }

// readOebin reads and checks structure.oebin.
func readOebin(path string) (*oebin, error) {
	buf, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("playback: %w", err)
	}
	var o oebin
	if err := json.Unmarshal(buf, &o); err != nil {
		var se *json.SyntaxError
		if errors.As(err, &se) {
			line := 1 + bytes.Count(buf[:min(int(se.Offset), len(buf))], []byte("\n"))
			return nil, fmt.Errorf("playback: %s: not valid JSON (line %d): %v", path, line, err)
		}
		return nil, fmt.Errorf("playback: %s: unexpected content: %v", path, err)
	}
	if len(o.Continuous) == 0 {
		return nil, fmt.Errorf("playback: %s: no continuous streams", path)
	}
	return &o, nil
}

// guiVersionAtLeast06 reports whether the oebin's "GUI version" is 0.6 or
// later (sample_numbers.npy naming), and whether the version was readable.
func (o *oebin) guiVersionAtLeast06() (newer, known bool) {
	parts := strings.SplitN(strings.TrimSpace(o.GUIVersion), ".", 3)
	if len(parts) < 2 {
		return false, false
	}
	major, err1 := strconv.Atoi(parts[0])
	minor, err2 := strconv.Atoi(parts[1][:digitRun(parts[1])])
	if err1 != nil || err2 != nil {
		return false, false
	}
	return major > 0 || minor >= 6, true
}

// streamNames lists the continuous streams for error messages.
func (o *oebin) streamNames() string {
	names := make([]string, len(o.Continuous))
	for i, c := range o.Continuous {
		names[i] = folder(c.FolderName)
	}
	return strings.Join(names, ", ")
}

// pickStream finds the continuous stream named by name (its folder name or
// its stream name); an empty name picks the first stream.
func (o *oebin) pickStream(path, name string) (*oebinContinuous, error) {
	if name == "" {
		return &o.Continuous[0], nil
	}
	want := folder(name)
	for i := range o.Continuous {
		if folder(o.Continuous[i].FolderName) == want {
			return &o.Continuous[i], nil
		}
	}
	var found []*oebinContinuous
	for i := range o.Continuous {
		if o.Continuous[i].StreamName == name {
			found = append(found, &o.Continuous[i])
		}
	}
	switch len(found) {
	case 1:
		return found[0], nil
	case 0:
		return nil, fmt.Errorf("playback: %s: no continuous stream named %q (streams: %s)", path, name, o.streamNames())
	default:
		var folders []string
		for _, c := range found {
			folders = append(folders, folder(c.FolderName))
		}
		return nil, fmt.Errorf("playback: %s: %d continuous streams are named %q; set stream to one of their folder names: %s", path, len(found), name, strings.Join(folders, ", "))
	}
}

// ttlEvents returns the event channels holding the stream's TTL events:
// folders <stream folder>/TTL (GUI ≥ 0.6) or <stream folder>/TTL_<n>
// (older versions).
func (o *oebin) ttlEvents(stream *oebinContinuous) []oebinEvents {
	prefix := folder(stream.FolderName) + "/TTL"
	var out []oebinEvents
	for _, e := range o.Events {
		if strings.HasPrefix(folder(e.FolderName), prefix) {
			out = append(out, e)
		}
	}
	return out
}

// findRecording resolves the configured path to one recording folder (the
// one holding structure.oebin): the path itself, or the only recording in
// the Record Node or session folder it names.
func findRecording(path string) (string, error) {
	st, err := os.Stat(path)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return "", fmt.Errorf("playback: path %s does not exist — set [source.playback] path to a recording folder (…/experiment1/recording1)", path)
		}
		return "", fmt.Errorf("playback: %w", err)
	}
	if !st.IsDir() {
		if filepath.Base(path) == "structure.oebin" {
			return filepath.Dir(path), nil
		}
		return "", fmt.Errorf("playback: path %s is a file; set it to a recording folder (…/experiment1/recording1) or the session folder holding it", path)
	}
	if _, err := os.Stat(filepath.Join(path, "structure.oebin")); err == nil {
		return path, nil
	}
	// A session (date) folder holds Record Node N/experimentN/recordingM;
	// one level more allows the folder that holds the session.
	const maxDepth = 4
	base := filepath.Clean(path)
	var found []string
	err = filepath.WalkDir(base, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			if p == base {
				return err
			}
			return nil // unreadable subfolder: not a recording we can play
		}
		if !d.IsDir() {
			return nil
		}
		rel, _ := filepath.Rel(base, p)
		depth := 0
		if rel != "." {
			depth = strings.Count(rel, string(filepath.Separator)) + 1
		}
		if depth > 0 {
			if _, err := os.Stat(filepath.Join(p, "structure.oebin")); err == nil {
				found = append(found, p)
				return fs.SkipDir
			}
		}
		if depth >= maxDepth {
			return fs.SkipDir
		}
		return nil
	})
	if err != nil {
		return "", fmt.Errorf("playback: %w", err)
	}
	switch len(found) {
	case 1:
		return found[0], nil
	case 0:
		return "", fmt.Errorf("playback: %s: no recording found (no structure.oebin in it or in the folders up to %d levels below) — set path to a recording folder (…/experiment1/recording1)", path, maxDepth)
	}
	sort.Slice(found, func(i, j int) bool { return naturalLess(found[i], found[j]) })
	rels := make([]string, len(found))
	for i, f := range found {
		rels[i], _ = filepath.Rel(base, f)
	}
	return "", fmt.Errorf("playback: %s holds %d recordings; set path to one of them: %s", path, len(found), strings.Join(rels, ", "))
}

// naturalLess orders strings with embedded numbers by value, so that
// recording2 comes before recording10.
func naturalLess(a, b string) bool {
	for a != "" && b != "" {
		da, db := digitRun(a), digitRun(b)
		if da > 0 && db > 0 {
			na, nb := strings.TrimLeft(a[:da], "0"), strings.TrimLeft(b[:db], "0")
			if len(na) != len(nb) {
				return len(na) < len(nb)
			}
			if na != nb {
				return na < nb
			}
			a, b = a[da:], b[db:]
			continue
		}
		if a[0] != b[0] {
			return a[0] < b[0]
		}
		a, b = a[1:], b[1:]
	}
	return len(a) < len(b)
}

func digitRun(s string) int {
	i := 0
	for i < len(s) && s[i] >= '0' && s[i] <= '9' {
		i++
	}
	return i
}
