-- wrk: the soak test's mix against benches/peers/hostile_origin.py. Most requests are
-- cacheable 1 KiB objects over a key space larger than the store; the rest ask the origin
-- to misbehave (bodies above and below the store's bound, with and without a length,
-- stalls, resets, truncated bodies, 5xx, oversized response fields) or send a request
-- header section above the proxy's limit. done() prints the status mix and socket errors.
counts = {}
sent = 0
local threads = {}
local big_header = string.rep("z", 100 * 1024)

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  math.randomseed(os.time() + tonumber(tostring({}):match("0x(%x+)"), 16))
end

local mix = {
  {55, function(n) return "/ok/" .. n % 4000 end},
  {8, function(n) return "/ok/hot" .. n % 20 end},
  {4, function(n) return "/big/" .. n % 40 .. "?kb=2048" end},
  {4, function(n) return "/big/s" .. n % 40 .. "?kb=200" end},
  {3, function(n) return "/chunked/" .. n % 40 .. "?kb=1500" end},
  {3, function(n) return "/chunked/s" .. n % 40 .. "?kb=100" end},
  {2, function(n) return "/close/" .. n % 40 .. "?kb=300" end},
  {3, function(n) return "/stall/" .. n % 1000 .. "?ms=3000" end},
  {3, function(n) return "/reset/" .. n end},
  {3, function(n) return "/cut/" .. n end},
  {6, function(n) return "/error/" .. n % 200 end},
  {2, function(n) return "/headers/" .. n % 100 .. "?n=200" end},
  {2, function(n) return "/fat/" .. n % 100 .. "?kb=" .. (n % 2 == 0 and 32 or 600) end},
}
local total = 0
for _, entry in ipairs(mix) do total = total + entry[1] end

function request()
  sent = sent + 1
  local n = math.random(0, 1000000)
  local pick = math.random(1, total + 1)
  if pick > total then
    return wrk.format("GET", "/ok/" .. n % 4000, {["X-Big"] = big_header})
  end
  for _, entry in ipairs(mix) do
    pick = pick - entry[1]
    if pick <= 0 then return wrk.format("GET", entry[2](n)) end
  end
end

function response(status, headers, body)
  counts[status] = (counts[status] or 0) + 1
end

function done(summary, latency, requests)
  local all, sent_all = {}, 0
  for _, thread in ipairs(threads) do
    sent_all = sent_all + thread:get("sent")
    for status, n in pairs(thread:get("counts")) do all[status] = (all[status] or 0) + n end
  end
  local line = "status"
  local statuses = {}
  for status in pairs(all) do table.insert(statuses, status) end
  table.sort(statuses)
  for _, status in ipairs(statuses) do line = line .. " " .. status .. ":" .. all[status] end
  local e = summary.errors
  print(line)
  print(string.format("sent %d answered %d; socket errors connect %d read %d write %d timeout %d",
    sent_all, summary.requests, e.connect, e.read, e.write, e.timeout))
end
