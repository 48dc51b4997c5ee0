-- wrk script for `make bench` (bench/loadgen.py). Configured through the environment:
--   BENCH_BODY_FILE  a file whose bytes are sent as a POST body (Content-Type: application/json)
--   BENCH_HEADERS    extra request headers, one "Name: value" per line
-- At the end it prints one line "BENCH_JSON {...}" with counts, bytes and latency percentiles (us).
local body_file = os.getenv("BENCH_BODY_FILE")
if body_file ~= nil and body_file ~= "" then
  local f = assert(io.open(body_file, "rb"))
  wrk.body = f:read("*a")
  f:close()
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end

local extra = os.getenv("BENCH_HEADERS")
if extra ~= nil and extra ~= "" then
  for line in string.gmatch(extra, "[^\n]+") do
    local name, value = string.match(line, "^([^:]+):%s*(.*)$")
    if name ~= nil then
      wrk.headers[name] = value
    end
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests": %d, "bytes": %d, "duration_us": %d, '
      .. '"err_connect": %d, "err_read": %d, "err_write": %d, "err_status": %d, '
      .. '"err_timeout": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, "mean_us": %.1f, '
      .. '"max_us": %d}\n',
    summary.requests, summary.bytes, summary.duration,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.mean, latency.max))
end
