// ephys_py.h — the C side of pyrt: the only code in ephysd that touches
// PyObject. Go holds ephys_stage pointers as opaque handles.
#ifndef EPHYS_PY_H
#define EPHYS_PY_H

#include <stdint.h>

#define EPHYS_MAX_EVENTS 4096

// ephys_out_event is one add_python_event call, read by Go after process.
typedef struct {
	int32_t line;
	int32_t state;
	int64_t sample; // -1: stamp with the block's first sample number
} ephys_out_event;

typedef struct ephys_stage ephys_stage;

// Interpreter.
int ephys_init(const char *program, const char *stdlib_check, double switch_interval, char **err);
int ephys_is_initialized(void);
const char *ephys_linked_version(void);
char *ephys_sys_info(void); // "prefix\nexecutable\nversion\nnumpy version" (malloc'd)
int ephys_on_thread(void);

// Stages. ephys_stage_load runs on any thread (it takes the GIL itself).
ephys_stage *ephys_stage_new(int id, const char *name);
int ephys_stage_load(ephys_stage *st, const char *path, const char *modname, int channels, double rate, char **err);
int ephys_stage_commit(ephys_stage *st);   // interpreter thread: the loaded instance becomes current
void ephys_stage_discard(ephys_stage *st); // any thread: drop a loaded instance not committed
int ephys_stage_has_current(ephys_stage *st);
void ephys_stage_set_accepting(ephys_stage *st, int on);

// Calls on the interpreter thread. Return 0 on success, 1 if Python raised
// (the exception is kept in the stage), 2 if the member does not exist,
// -1 if called from the wrong thread.
// ephys_stage_process returns EPHYS_RETAINED or-ed in when the script kept a
// view of data after process returned.
int ephys_stage_process(ephys_stage *st, float *data, int channels, int samples, int64_t first);
#define EPHYS_RETAINED 0x100
int ephys_stage_ttl(ephys_stage *st, int source_node, int line, int state, int64_t sample);
int ephys_stage_spike(ephys_stage *st, int source_node, const char *electrode, int channels, int samples,
                      int64_t sample, int sorted_id, const float *waveform);
int ephys_stage_hook(ephys_stage *st, int which, const char *arg); // see EPHYS_HOOK_*

#define EPHYS_HOOK_START_ACQ 0
#define EPHYS_HOOK_STOP_ACQ 1
#define EPHYS_HOOK_START_REC 2
#define EPHYS_HOOK_STOP_REC 3

// Events queued by add_python_event since the last reset.
ephys_out_event *ephys_stage_events(ephys_stage *st);
int ephys_stage_nevents(ephys_stage *st);
int64_t ephys_stage_dropped(ephys_stage *st);
void ephys_stage_events_reset(ephys_stage *st);

// The last exception, formatted (full traceback or its last line); NULL if
// none. Clears it. Result is malloc'd. full < 0 only clears.
char *ephys_stage_error(ephys_stage *st, int full);

// Event channel names passed to handle_ttl_event, by source processor id.
int ephys_register_channel(int processor_id, const char *name);

// Raise TimeoutError in the interpreter thread at its next bytecode if the
// per-block call `call` is still running (any thread; blocks until it can
// take the GIL). Returns 1 if it did.
int ephys_interrupt(int64_t call);
// The id of the latest per-block call, whether it is still running, and
// its stage id.
int64_t ephys_call_state(int *active, int *stage);

// Run Python source on the interpreter thread (tests, diagnostics).
int ephys_run_string(const char *code, char **err);

#endif
