// The page's state in one place: the constants, every panel's data, and `page` (what was a loose variable).

export const MAX_ROWS = 200;    // rendered table rows cap
export const MAX_KEPT = 1000;   // tasks kept in memory; the oldest beyond this are forgotten
export const WS_MIN = 500;      // reconnect backoff start (ms)
export const WS_MAX = 10000;    // reconnect backoff ceiling (ms)
export const RESULT_MAX = 500;  // chars of result/error shown in a cell (full text in title)
export const TERMINAL = new Set(['completed', 'failed', 'rejected', 'cancelled']);
export const CANCELLABLE = new Set(['pending', 'scheduled', 'retrying', 'started']); // POST .../cancel stops these
export const TOKEN_KEY = 'asyncnode.token'; // sessionStorage key of the API access token
export const HIST_MAX = 50;     // status changes remembered per task (for the details timeline)
export const SEARCH_DELAY = 250; // ms after the last keystroke in the search box before the server is asked

export const CHART_SPAN = 300;        // seconds of history in the throughput chart
export const CHART_MIN_GAP = 1000;    // ms between two data-driven chart redraws
export const SUMMARY_EVERY = 5000;    // ms between updates of the chart's text summary
export const STATS_STALE = 5000;      // ms without a stats message before the figures grey out
export const WORKERS_POLL = 2000;     // ms between GET /api/workers
export const WORKERS_VIA_STATS = 3500; // ms a worker list carried by stats makes polling unnecessary
export const WORKER_GONE_KEEP = 30000; // ms a worker missing from the list stays (greyed out)
export const DLQ_POLL = 3000;         // ms between GET /api/dlq
export const DLQ_LIMIT = 100;         // dead letters fetched per poll
export const QUEUES_POLL = 2000;      // ms between GET /api/queues
export const QUEUES_VIA_STATS = 3500; // ms a queue list carried by stats makes polling unnecessary
export const QUEUE_ANSWER_HOLD = 3000; // ms a pause/resume answer outranks a list that disagrees
export const SCHEDULES_POLL = 3000;   // ms between GET /api/schedules
export const SCHEDULES_DUE_GAP = 1000; // ms at least between two polls asked for by a next run that came

export const tasks = new Map(); // id -> merged task object
export const rows = new Map();  // id -> <tr> currently in the table
export const dirty = new Set(); // ids changed since the last animation frame
export const cancels = new Map(); // id -> {busy, error, detail, done}: this page's cancel of that task
export const countdowns = new Set(); // <tr> of the scheduled tasks shown: their countdowns tick
export const filter = { q: '', status: '', type: '', queue: '', schedule: '', since: '', until: '' }; // task table filters ('' = all; since, until: epoch seconds)

// Ages tick only in rows that can be seen (the table scrolls inside its box), so that the
// clock does not re-lay out 200 rows every second; a row coming into view is refreshed.
export const inView = typeof IntersectionObserver === 'function' ? new Set() : null;

/** The server's answer to the search box (GET /api/tasks?q=...&status=...): ids null until one came. */
export const search = { ids: null, total: 0, next: null, req: 0, timer: 0, error: '', loading: false };

export const details = {
  id: null,        // task shown, null when closed
  fetched: null,   // GET /api/tasks/<id> answer (with history)
  loading: false,
  error: '',
  req: 0,          // guards against answers for a task no longer shown
  opener: null,    // element focused before opening (focus returns there)
  shownStatus: undefined,
  refetchTimer: 0,
};

/** The tasks a bulk action would act on: the rows ticked (ids), or every task the filters match on the
 *  server (all, with their total); the action waiting for its confirmation; a request in flight. */
export const bulk = { ids: new Set(), all: false, total: 0, pending: '', busy: false };

export const chart = {
  samples: [],     // {ts, c, f, s, q, d} oldest first, CHART_SPAN seconds (+1 before)
  lastRecv: 0,     // Date.now() when the newest sample arrived
  lastDraw: 0,
  timer: 0,
  frame: false,
  ctx: undefined,  // 2D context (null where canvas is unsupported)
  w: 0, h: 0,      // CSS pixel size of the canvas
  hoverX: null,
  colors: null,
  summaryAt: 0,
  summaryDirty: false,
};

export const workers = new Map(); // worker id -> {tr, td, data, recvAt, goneAt, cur}

export const dlq = {
  rows: new Map(),  // key -> {tr, td, el, item, sig, busy, armed}
  total: null,
  busyAll: false,
  version: 0,       // bumped by every action, so an older poll answer cannot resurrect rows
  group: '',        // the fingerprint whose letters alone are shown ('' = every letter)
};

/** Dead letters by fingerprint (GET /api/dlq/groups), read while the "Grouped by error" box is open. */
export const groups = { req: 0, busy: false };

/** The dead letter being edited in dialog#dlq-edit, and the button that opened it (focus returns there). */
export const editing = { item: null, opener: null, busy: false };

export const queues = {
  rows: new Map(),  // name -> {name, tr, td, el, item, busy, answered}
};

export const schedules = {
  rows: new Map(),  // name -> {name, tr, td, el, item, busy}
  version: 0,       // bumped by every action, so an older poll answer cannot undo what it did
  polledAt: 0,      // Date.now() of the last poll asked for by a next run that came
};

// One prompt at a time: every call that got a 401 waits on the same open dialog.
export const tokenPrompt = {
  waiters: [],      // resolve functions of calls waiting for a token (null = dismissed)
  checking: null,   // token submitted from the dialog whose first answer is still awaited
  returnFocus: null,
};

export const pollers = {}; // name -> {now(), again, busy}

/** What the panels change and share besides their data (each was a variable of the one script). */
export const page = {
  frameQueued: false,
  rowObserver: null,
  statsAt: 0,  // Date.now() of the last stats message (0: none yet)
  dlqPolledAt: 0,
  workersViaStatsAt: 0,
  workersListedAt: 0,  // Date.now() of the last list of live workers (0: none yet)  // Date.now() of the last worker list carried by a stats message
  queuesViaStatsAt: 0,  // Date.now() of the last queue list carried by a stats message
  memToken: '',  // fallback when sessionStorage is unavailable (blocked storage)
  storageOk: true,
  needToken: false,
  sock: null,
  backoff: WS_MIN,
  openedAt: 0,
  reconnectTimer: 0,
  authBlocked: false,  // the socket needs a token and the prompt was dismissed
  pollingStarted: false,
  accessToken: undefined,  // the token the current data-access was learnt with
};
