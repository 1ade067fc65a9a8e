-- wrk: every request a URL never asked for before (a flood of distinct keys).
local counter = 0
local thread_id = 0
local threads = 0

function setup(thread)
  thread:set("thread_id", threads)
  threads = threads + 1
end

function request()
  counter = counter + 1
  return wrk.format("GET", "/obj/t" .. thread_id .. "-" .. counter)
end
