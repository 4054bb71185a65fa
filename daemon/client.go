package daemon

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"os/user"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// ClientUsage documents the commands that drive a running ephysd over its
// control socket (the lead appends it to the ephysd usage text).
const ClientUsage = `Commands for a running ephysd (over its control socket):

  ephysd status [--watch] [--count N]
      Mode, source, samples/s, block latency, overruns, the recording in
      progress, each Python stage's state and timing, devices. --watch
      redraws every second until Ctrl-C (on a non-terminal: one line a second);
      --count N stops after N updates.

  ephysd acquire
      Start acquiring (from IDLE), or stop recording and keep acquiring (from RECORD).

  ephysd record [--dir PARENT] [--prepend TEXT] [--base TEXT] [--append TEXT]
      Start recording (acquiring first if IDLE) into PARENT/<prepend><base><append>
      (base empty: the date and time). Naming changes apply from the next record start.

  ephysd stop
  ephysd idle
      Stop recording (files finalised) and acquisition: back to IDLE. (The
      Open Ephys GUI has no "stop"; use "ephysd acquire" to stop recording only.)

  ephysd message TEXT…
      Record TEXT under events/MessageCenter at the current sample (while acquiring).

  ephysd reload
      Re-read the configuration file and re-import the Python modules.

  ephysd stages [reload | module ID FILE]
      List the Python stages; reload every stage's module; or point stage ID
      at another module FILE (in a folder of [control] module_dirs).

  Every command takes --socket PATH (default: $RUNTIME_DIRECTORY, $XDG_RUNTIME_DIR/ephysd,
  /run/ephysd or /tmp/ephysd-<uid>, whichever has control.sock) and --json (print the
  daemon's JSON answer).
`

// clientCommand runs one of the CLI's commands against a running ephysd.
func clientCommand(name string, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("ephysd "+name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { fmt.Fprint(stderr, ClientUsage) }
	socket := fs.String("socket", "", "the daemon's control socket")
	asJSON := fs.Bool("json", false, "print the daemon's JSON answer")
	var watch *bool
	var count *int
	var dir, prepend, base, appendText *string
	switch name {
	case "status":
		watch = fs.Bool("watch", false, "redraw every second until Ctrl-C")
		count = fs.Int("count", 0, "with --watch: stop after this many updates (0: never)")
	case "record":
		dir = fs.String("dir", "", "parent folder of the session folder")
		prepend = fs.String("prepend", "", "text before the base of the session folder's name")
		base = fs.String("base", "", "base of the session folder's name (empty: date and time)")
		appendText = fs.String("append", "", "text after the base of the session folder's name")
	}
	pos, err := parseInterspersed(fs, args)
	if err != nil {
		return err
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })

	cl, err := newClient(*socket)
	if err != nil {
		return err
	}
	out := func(raw []byte, text func()) error {
		if *asJSON {
			var buf bytes.Buffer
			if json.Indent(&buf, raw, "", "  ") != nil {
				buf.Reset()
				buf.Write(raw)
			}
			fmt.Fprintln(stdout, strings.TrimSpace(buf.String()))
			return nil
		}
		text()
		return nil
	}
	noArgs := func() error {
		if len(pos) > 0 {
			return usageError{fmt.Errorf("%s: unexpected argument %q", name, pos[0])}
		}
		return nil
	}

	switch name {
	case "status":
		if err := noArgs(); err != nil {
			return err
		}
		if *watch {
			return cl.watch(stdout, *asJSON, *count)
		}
		var st ControlStatus
		raw, err := cl.call(http.MethodGet, "/api/ephysd/status", nil, &st)
		if err != nil {
			return err
		}
		return out(raw, func() { renderStatus(stdout, &st) })

	case "acquire", "stop", "idle":
		if err := noArgs(); err != nil {
			return err
		}
		m := Acquire
		if name != "acquire" {
			m = Idle
		}
		var before ControlStatus
		if _, err := cl.call(http.MethodGet, "/api/ephysd/status", nil, &before); err != nil {
			return err
		}
		var res modeJSON
		raw, err := cl.call(http.MethodPut, "/api/status", map[string]string{"mode": string(m)}, &res)
		if err != nil {
			return err
		}
		return out(raw, func() {
			fmt.Fprintln(stdout, res.Mode)
			if before.Recording != nil {
				fmt.Fprintf(stdout, "recording saved in %s (%s, %s)\n", before.Recording.Path,
					fmtBytes(before.Recording.Bytes), fmtSeconds(before.Recording.Seconds))
			}
		})

	case "record":
		if err := noArgs(); err != nil {
			return err
		}
		naming := map[string]string{}
		if set["dir"] {
			d, err := filepath.Abs(*dir)
			if err != nil {
				return err
			}
			naming["parent_directory"] = d
		}
		for _, f := range []struct {
			flag, key string
			value     *string
		}{{"prepend", "prepend_text", prepend}, {"base", "base_text", base}, {"append", "append_text", appendText}} {
			if set[f.flag] {
				naming[f.key] = *f.value
			}
		}
		var before ControlStatus
		if _, err := cl.call(http.MethodGet, "/api/ephysd/status", nil, &before); err != nil {
			return err
		}
		if len(naming) > 0 {
			if _, err := cl.call(http.MethodPut, "/api/recording", naming, nil); err != nil {
				return err
			}
		}
		if _, err := cl.call(http.MethodPut, "/api/status", map[string]string{"mode": string(Record)}, nil); err != nil {
			return err
		}
		var st ControlStatus
		raw, err := cl.call(http.MethodGet, "/api/ephysd/status", nil, &st)
		if err != nil {
			return err
		}
		return out(raw, func() {
			fmt.Fprintln(stdout, st.Mode)
			if st.Recording != nil {
				fmt.Fprintf(stdout, "recording into %s\n", st.Recording.Path)
			}
			if before.Mode == Record && len(naming) > 0 {
				fmt.Fprintln(stdout, "(already recording: the new naming applies from the next record start)")
			}
		})

	case "message":
		text := strings.Join(pos, " ")
		if text == "" {
			return usageError{errors.New("message: give the text to record, e.g. ephysd message stimulus on")}
		}
		var res modeJSON
		raw, err := cl.call(http.MethodPut, "/api/message", map[string]string{"text": text}, &res)
		if err != nil {
			return err
		}
		return out(raw, func() { fmt.Fprintf(stdout, "message recorded: %q\n", text) })

	case "reload":
		if err := noArgs(); err != nil {
			return err
		}
		var res struct {
			Notes string `json:"notes"`
		}
		raw, err := cl.call(http.MethodPut, "/api/ephysd/reload", struct{}{}, &res)
		if err != nil {
			return err
		}
		return out(raw, func() {
			fmt.Fprintln(stdout, "configuration reloaded")
			for _, n := range strings.Split(res.Notes, "; ") {
				if n != "" {
					fmt.Fprintf(stdout, "note: %s\n", n)
				}
			}
		})

	case "stages":
		switch {
		case len(pos) == 0:
			var st ControlStatus
			raw, err := cl.call(http.MethodGet, "/api/ephysd/status", nil, &st)
			if err != nil {
				return err
			}
			return out(raw, func() { renderStages(stdout, &st, "") })
		case pos[0] == "reload" && len(pos) == 1:
			var res struct {
				Info string `json:"info"`
			}
			raw, err := cl.call(http.MethodPut, "/api/ephysd/stages/reload", struct{}{}, &res)
			if err != nil {
				return err
			}
			return out(raw, func() { fmt.Fprintln(stdout, res.Info) })
		case pos[0] == "module" && len(pos) == 3:
			id, err := strconv.Atoi(pos[1])
			if err != nil {
				return usageError{fmt.Errorf("stages module: %q is not a stage id (see ephysd stages)", pos[1])}
			}
			path, err := filepath.Abs(pos[2])
			if err != nil {
				return err
			}
			var res parameterJSON
			raw, err := cl.call(http.MethodPut, fmt.Sprintf("/api/processors/%d/parameters/module", id), map[string]string{"value": path}, &res)
			if err != nil {
				if errors.Is(err, errNotFound) {
					return fmt.Errorf("no Python stage has id %d (see ephysd stages)", id)
				}
				return err
			}
			return out(raw, func() { fmt.Fprintf(stdout, "stage %d runs %s\n", id, res.Value) })
		}
		return usageError{errors.New("stages: use ephysd stages, ephysd stages reload, or ephysd stages module ID FILE")}
	}
	return usageError{fmt.Errorf("unknown command %q", name)}
}

// parseInterspersed parses flags that may come after positional arguments.
func parseInterspersed(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		args = fs.Args()
		if len(args) == 0 {
			return pos, nil
		}
		pos = append(pos, args[0])
		args = args[1:]
	}
}

// client talks HTTP to the daemon over its unix socket.
type client struct {
	socket string
	http   *http.Client
}

var errNotFound = errors.New("not found")

// clientSocketDirs are the folders a daemon's default socket may be in, in
// the order the client looks.
func clientSocketDirs() []string {
	var dirs []string
	if d := os.Getenv("RUNTIME_DIRECTORY"); d != "" {
		dirs = append(dirs, defaultSocketDir())
	}
	if d := os.Getenv("XDG_RUNTIME_DIR"); d != "" {
		dirs = append(dirs, filepath.Join(d, "ephysd"))
	}
	return append(dirs, "/run/ephysd", fmt.Sprintf("/tmp/ephysd-%d", os.Getuid()))
}

func newClient(socket string) (*client, error) {
	if socket == "" {
		for _, d := range clientSocketDirs() {
			p := filepath.Join(d, "control.sock")
			if _, err := os.Lstat(p); err == nil || errors.Is(err, os.ErrPermission) {
				socket = p
				break
			}
		}
		if socket == "" {
			return nil, fmt.Errorf("no ephysd is listening on /run/ephysd/control.sock — is the service running? (systemctl status ephysd); also looked in %s; give --socket PATH for another place",
				strings.Join(clientSocketDirs(), ", "))
		}
	}
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		},
		MaxIdleConns: 1,
	}
	// Mode changes wait for the pipeline to drain and the files to be
	// finalised, which can take a few seconds.
	return &client{socket: socket, http: &http.Client{Transport: tr, Timeout: 2 * time.Minute}}, nil
}

// call sends body (JSON, if not nil) and decodes a 2xx answer into out (if
// not nil). It returns the answer's bytes.
func (c *client) call(method, path string, body, out any) ([]byte, error) {
	var rd io.Reader
	if body != nil {
		data, err := json.Marshal(body)
		if err != nil {
			return nil, err
		}
		rd = bytes.NewReader(data)
	}
	req, err := http.NewRequest(method, "http://ephysd"+path, rd)
	if err != nil {
		return nil, err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return nil, c.dialError(err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, fmt.Errorf("reading the answer of ephysd (%s): %w", c.socket, err)
	}
	switch {
	case resp.StatusCode == http.StatusNotFound:
		why := "is this ephysd older than this client?"
		if text := strings.TrimSpace(string(data)); text != "" {
			why = text // the daemon's reason: unknown path, processor, parameter…
		}
		return nil, fmt.Errorf("%s %s: %w (%s)", method, path, errNotFound, why)
	case resp.StatusCode/100 != 2:
		text := strings.TrimSpace(string(data))
		if text == "" {
			text = resp.Status
		}
		return nil, errors.New(text)
	}
	if out != nil {
		if err := json.Unmarshal(data, out); err != nil {
			return nil, fmt.Errorf("unexpected answer from ephysd: %w", err)
		}
	}
	return data, nil
}

// dialError explains a failure to reach the daemon.
func (c *client) dialError(err error) error {
	switch {
	case errors.Is(err, syscall.ENOENT), errors.Is(err, syscall.ECONNREFUSED):
		return fmt.Errorf("no ephysd is listening on %s — is the service running? (systemctl status ephysd)", c.socket)
	case errors.Is(err, syscall.EACCES), errors.Is(err, syscall.EPERM):
		group := socketGroup(c.socket)
		if group == "" {
			return fmt.Errorf("permission denied on %s: run as the service user or a member of the socket's group", c.socket)
		}
		return fmt.Errorf("permission denied on %s: add yourself to group %s (sudo usermod -aG %s $USER, then log in again)", c.socket, group, group)
	}
	return fmt.Errorf("ephysd at %s: %w", c.socket, err)
}

// socketGroup names the group that owns the socket (or its folder, when
// the socket cannot be seen).
func socketGroup(path string) string {
	for _, p := range []string{path, filepath.Dir(path)} {
		fi, err := os.Stat(p)
		if err != nil {
			continue
		}
		st, ok := fi.Sys().(*syscall.Stat_t)
		if !ok {
			return ""
		}
		gid := strconv.Itoa(int(st.Gid))
		if g, err := user.LookupGroupId(gid); err == nil {
			return g.Name
		}
		return gid
	}
	return ""
}

// watch redraws the status every second until Ctrl-C (or count updates).
func (c *client) watch(w io.Writer, asJSON bool, count int) error {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	term := isTerminal(w) && !asJSON
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for n := 1; ; n++ {
		var st ControlStatus
		raw, err := c.call(http.MethodGet, "/api/ephysd/status", nil, &st)
		switch {
		case term:
			fmt.Fprint(w, "\033[H\033[2J")
			if err != nil {
				fmt.Fprintf(w, "%s  %v\n", time.Now().Format("15:04:05"), err)
			} else {
				renderStatus(w, &st)
			}
			fmt.Fprintf(w, "\n%s — every second; Ctrl-C to quit\n", time.Now().Format("15:04:05"))
		case err != nil:
			fmt.Fprintf(w, "%s  %v\n", time.Now().Format("15:04:05"), err)
		case asJSON:
			fmt.Fprintln(w, strings.TrimSpace(string(raw)))
		default:
			fmt.Fprintln(w, statusLine(&st))
		}
		if count > 0 && n >= count {
			return nil
		}
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
		}
	}
}

// statusLine is the status on one line (watch on a non-terminal).
func statusLine(st *ControlStatus) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s %s", time.Now().Format("15:04:05"), st.Mode)
	if p := st.Pipeline; p != nil {
		fmt.Fprintf(&b, " %.0f samples/s latency p50 %s p99 %s overruns %d", p.SamplesPerSec, fmtUS(p.LatencyP50), fmtUS(p.LatencyP99), p.Overruns)
	}
	if r := st.Recording; r != nil {
		fmt.Fprintf(&b, " rec %s %s %s", r.Path, fmtBytes(r.Bytes), fmtSeconds(r.Seconds))
	}
	if st.RecordingError != "" {
		fmt.Fprintf(&b, " RECORDING FAILED: %s", st.RecordingError)
	}
	for _, s := range st.Stages {
		fmt.Fprintf(&b, " [%d %s %s p50 %s p99 %s]", s.ID, s.Name, s.State, fmtUS(s.P50), fmtUS(s.P99))
	}
	fmt.Fprintf(&b, " cpu %.0f%%", st.CPU*100)
	if st.Health != "ok" {
		fmt.Fprintf(&b, " health: %s", st.Health)
	}
	return b.String()
}

// renderStatus prints the status for people.
func renderStatus(w io.Writer, st *ControlStatus) {
	fmt.Fprintf(w, "mode        %s   (up %s, CPU %.0f%%, health %s)\n", st.Mode, fmtSeconds(st.Uptime), st.CPU*100, st.Health)
	if s := st.Source; s != nil {
		fmt.Fprintf(w, "source      %s (%s): %d channels at %g Hz\n", s.Name, s.Driver, s.Channels, s.SampleRate)
		if d := s.Device; d != nil {
			fmt.Fprintf(w, "device      %s\n", deviceText(d))
		}
	}
	if p := st.Pipeline; p != nil {
		fmt.Fprintf(w, "throughput  %.0f samples/s, blocks of %d samples, %d blocks\n", p.SamplesPerSec, p.BlockSamples, p.Blocks)
		fmt.Fprintf(w, "latency     per block p50 %s  p99 %s  max %s\n", fmtUS(p.LatencyP50), fmtUS(p.LatencyP99), fmtUS(p.LatencyMax))
		fmt.Fprintf(w, "overruns    %d blocks (%d samples dropped)", p.Overruns, p.OverrunSamples)
		if p.Gaps > 0 {
			fmt.Fprintf(w, ", source gaps %d (%d samples missing)", p.Gaps, p.GapSamples)
		}
		fmt.Fprintf(w, ", queues %d/%d\n", p.QueueStages, p.QueueRecorder)
	}
	if r := st.Recording; r != nil {
		fmt.Fprintf(w, "recording   %s\n            %s, %s (experiment %d, recording %d)\n", r.Path, fmtBytes(r.Bytes), fmtSeconds(r.Seconds), r.Experiment, r.Number)
	} else if st.SessionFolder != "" {
		fmt.Fprintf(w, "session     %s\n", st.SessionFolder)
	}
	if st.RecordingError != "" {
		fmt.Fprintf(w, "recording   FAILED: %s\n            (acquisition, Python and outputs go on; ephysd record starts a new recording)\n", st.RecordingError)
	}
	renderStages(w, st, "stages      ")
	for _, d := range append(append([]DeviceInfo(nil), st.Outputs...), st.Inputs...) {
		d := d
		fmt.Fprintf(w, "device      %s\n", deviceText(&d))
	}
	if st.LastError != "" {
		fmt.Fprintf(w, "last error  %s\n", st.LastError)
	}
	if tb := st.LastTraceback; tb != nil {
		fmt.Fprintf(w, "traceback   stage %s at %s:\n%s\n", tb.Stage, tb.At.Format("15:04:05"), indent(tb.Text, "            "))
	}
}

// renderStages prints one line per Python stage.
func renderStages(w io.Writer, st *ControlStatus, prefix string) {
	if len(st.Stages) == 0 {
		if prefix == "" {
			fmt.Fprintln(w, "no Python stage is loaded (they load at the first acquisition)")
		}
		return
	}
	stages := append([]StageInfo(nil), st.Stages...)
	sort.Slice(stages, func(i, j int) bool { return stages[i].ID < stages[j].ID })
	pad := strings.Repeat(" ", len(prefix))
	for i, s := range stages {
		lead := pad
		if i == 0 {
			lead = prefix
		}
		fmt.Fprintf(w, "%s%d %s [%s]  p50 %s  p99 %s  max %s", lead, s.ID, s.Name, s.State, fmtUS(s.P50), fmtUS(s.P99), fmtUS(s.Max))
		if s.Errors > 0 {
			fmt.Fprintf(w, "  errors %d, last: %s", s.Errors, s.LastError)
		}
		if s.Retained {
			fmt.Fprint(w, "  (keeps a reference to a data array)")
		}
		if wk := s.Worker; wk != nil {
			if wk.PID != 0 {
				fmt.Fprintf(w, "  worker pid %d", wk.PID)
			} else {
				fmt.Fprint(w, "  worker down")
			}
			if wk.Restarts > 0 {
				fmt.Fprintf(w, ", %d restarts", wk.Restarts)
			}
		}
		fmt.Fprintf(w, "\n%s    %s\n", pad, s.Path)
	}
}

func deviceText(d *DeviceInfo) string {
	state := "connected"
	if !d.Connected {
		state = "DISCONNECTED"
	}
	s := fmt.Sprintf("%s: %s, %d disconnects", d.Name, state, d.Disconnects)
	if d.Dropped > 0 {
		s += fmt.Sprintf(", %d blocks of events dropped while away", d.Dropped)
	}
	if d.LastError != "" {
		s += " (last error: " + d.LastError + ")"
	}
	return s
}

func indent(s, prefix string) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	for i := range lines {
		lines[i] = prefix + lines[i]
	}
	return strings.Join(lines, "\n")
}

// fmtUS formats microseconds.
func fmtUS(us float64) string {
	switch {
	case us < 1000:
		return fmt.Sprintf("%.0fµs", us)
	case us < 1e6:
		return fmt.Sprintf("%.2fms", us/1000)
	}
	return fmt.Sprintf("%.2fs", us/1e6)
}

func fmtBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}

func fmtSeconds(s float64) string {
	return time.Duration(s * float64(time.Second)).Round(time.Second).String()
}
