-- genrpc error shaper: REST clients see every error as OpenAI's {"error": {"message", "type", "param", "code"}}.
--
-- Placed before the gRPC-JSON transcoder, so on the response path it runs after it: the transcoder's
-- convert_grpc_status has already turned a gRPC error into an HTTP status and a google.rpc.Status JSON body
-- (decoded message, details ErrorInfo/BadRequest); this rewrites that body with the error table.
-- GRPC_ERRORS ({[grpc code] = {http status, "type" as JSON, "code" as JSON or "null"}}) and HTTP_ERROR_TYPES
-- ({[http status] = "type" as JSON}) are defined just above this file by envoy.yaml.j2, generated from
-- genrpc/error_table.py.
-- Native gRPC responses are never touched; every other response loses its grpc-* headers.

-- A JSON reader that keeps each string as its raw JSON literal (quotes and escapes included): the shaper only
-- copies strings into the JSON it writes, so it never unescapes or re-escapes them. Object keys are plain names
-- in a google.rpc.Status, so they are taken without their quotes.
local function skip_space(s, i) return s:find("%S", i) or (#s + 1) end

local read_value
read_value = function(s, i)
  i = skip_space(s, i)
  local c = s:sub(i, i)
  if c == '"' then
    local j = i + 1
    while true do
      local k = s:find('["\\]', j)
      if k == nil then error("unterminated string") end
      if s:sub(k, k) == '"' then return s:sub(i, k), k + 1 end
      j = k + 2  -- skip the escaped character
    end
  end
  if c == "{" or c == "[" then
    local is_object, close, t = c == "{", c == "{" and "}" or "]", {}
    i = skip_space(s, i + 1)
    if s:sub(i, i) == close then return t, i + 1 end
    while true do
      local key, v
      if is_object then
        key, i = read_value(s, i)
        i = skip_space(s, i)
        if s:sub(i, i) ~= ":" or key:sub(1, 1) ~= '"' then error("key expected") end
        i = i + 1
      end
      v, i = read_value(s, i)
      if is_object then t[key:sub(2, -2)] = v else t[#t + 1] = v end
      i = skip_space(s, i)
      c = s:sub(i, i)
      if c == close then return t, i + 1 end
      if c ~= "," then error("comma expected") end
      i = i + 1
    end
  end
  local literal = s:match("^[%w%.%+%-]+", i)
  if literal == nil then error("value expected") end
  if literal == "true" then return true, i + #literal end
  if literal == "false" then return false, i + #literal end
  if literal == "null" then return nil, i + #literal end
  local n = tonumber(literal)
  if n == nil then error("bad literal") end
  return n, i + #literal
end

-- `s` with every byte that is not part of a well-formed UTF-8 sequence replaced by U+FFFD: Envoy echoes the
-- client's bytes into some of its error messages (e.g. the transcoder's JSON parse errors), and an error body a
-- strict client cannot decode is no error message at all. Bytes >= 0x80 are never JSON syntax, so replacing them
-- keeps a JSON document's structure.
local REPLACEMENT = "\239\191\189"
local function clean_utf8(s)
  if not s:find("[\128-\255]") then return s end
  local out, i, n = {}, 1, #s
  while i <= n do
    local c = s:byte(i)
    local len, low, high = 0, 0x80, 0xBF
    if c < 0x80 then len = 1
    elseif c >= 0xC2 and c <= 0xDF then len = 2
    elseif c >= 0xE0 and c <= 0xEF then
      len = 3
      if c == 0xE0 then low = 0xA0 elseif c == 0xED then high = 0x9F end
    elseif c >= 0xF0 and c <= 0xF4 then
      len = 4
      if c == 0xF0 then low = 0x90 elseif c == 0xF4 then high = 0x8F end
    end
    local ok = len > 0 and i + len - 1 <= n
    if ok and len > 1 then
      local b = s:byte(i + 1)
      ok = b >= low and b <= high
      for k = 2, len - 1 do
        b = s:byte(i + k)
        ok = ok and b >= 0x80 and b <= 0xBF
      end
    end
    if ok then
      out[#out + 1] = s:sub(i, i + len - 1)
      i = i + len
    else
      out[#out + 1] = REPLACEMENT
      i = i + 1
    end
  end
  return table.concat(out)
end

local function is_json_string(v) return type(v) == "string" and v:sub(1, 1) == '"' end

-- A Lua string as a JSON string (for the plain-text errors, which are not JSON yet).
local function json_string(v)
  return '"' .. v:gsub('[%c"\\]', function(ch)
    if ch == '"' then return '\\"' end
    if ch == "\\" then return "\\\\" end
    if ch == "\n" then return "\\n" end
    if ch == "\r" then return "\\r" end
    if ch == "\t" then return "\\t" end
    return string.format("\\u%04x", ch:byte())
  end) .. '"'
end

local function openai_error(message, type_, param, code)
  return '{"error":{"message":' .. message .. ',"type":' .. type_ .. ',"param":' .. param .. ',"code":' .. code .. '}}'
end

local function ends_with(s, suffix) return s:sub(-#suffix) == suffix end

-- google.rpc.Status (strings raw) -> HTTP status, OpenAI error JSON
local function shape(status)
  local mapped = GRPC_ERRORS[status.code] or {500, '"server_error"', "null"}
  local param, code, retry_after = "null", mapped[3], nil
  for _, detail in ipairs(type(status.details) == "table" and status.details or {}) do
    local type_url = type(detail) == "table" and is_json_string(detail["@type"]) and detail["@type"] or ""
    if ends_with(type_url, 'google.rpc.ErrorInfo"') then
      if is_json_string(detail.reason) and detail.reason ~= '""' then code = detail.reason:lower() end
      if param == "null" and type(detail.metadata) == "table" and is_json_string(detail.metadata.param) then
        param = detail.metadata.param
      end
      -- a limit that knows when it frees up (the service's tokens-per-minute limit) -> retry-after
      if type(detail.metadata) == "table" and is_json_string(detail.metadata.retry_after_s) then
        retry_after = detail.metadata.retry_after_s:match('^"(%d+)"$')
      end
    elseif ends_with(type_url, 'google.rpc.BadRequest"') then
      local violations = detail.field_violations or detail.fieldViolations
      if type(violations) == "table" and type(violations[1]) == "table" and is_json_string(violations[1].field) then
        param = violations[1].field
      end
    end
  end
  local message = status.message
  if not is_json_string(message) or message == '""' then
    message = json_string("gRPC error " .. tostring(status.code))
  end
  return mapped[1], openai_error(message, mapped[2], param, code), retry_after
end

local GRPC_HEADERS = {"grpc-status", "grpc-message", "grpc-status-details-bin", "grpc-accept-encoding",
                      "grpc-encoding", "x-envoy-upstream-service-time"}

-- A 429 (the service's admission control, the engine's queue, the rate limit) tells clients when to retry; the
-- OpenAI SDKs honour `retry-after`.
local function add_retry_after(headers, http_status)
  if http_status == 429 and headers:get("retry-after") == nil then headers:add("retry-after", "1") end
end

function envoy_on_response(handle)
  local headers = handle:headers()
  local content_type = headers:get("content-type") or ""
  if content_type:find("application/grpc", 1, true) == 1 then return end  -- native gRPC: never touched
  for _, name in ipairs(GRPC_HEADERS) do headers:remove(name) end
  local http_status = tonumber(headers:get(":status")) or 200
  if http_status < 400 then return end
  add_retry_after(headers, http_status)
  local is_json = content_type:find("application/json", 1, true) == 1
  if not is_json and content_type ~= "" and content_type:find("text/plain", 1, true) ~= 1 then return end
  local body = handle:body()
  if body == nil or body:length() == 0 then return end
  local raw = clean_utf8(body:getBytes(0, body:length()))
  local out, retry_after
  if is_json then
    -- a google.rpc.Status from convert_grpc_status -> OpenAI error; anything else (already OpenAI) is kept, made
    -- valid UTF-8 (local_reply_config's %LOCAL_REPLY_BODY% may hold the client's raw bytes)
    local ok, status = pcall(read_value, raw, 1)
    if not ok or type(status) ~= "table" or status.error ~= nil or type(status.code) ~= "number" then
      if raw == body:getBytes(0, body:length()) then return end
      out = raw
    else
      http_status, out, retry_after = shape(status)
    end
  else
    -- a plain-text error (e.g. the transcoder's reply to malformed JSON) -> OpenAI error
    local message = raw:gsub("^%s+", ""):gsub("%s+$", "")
    local type_ = HTTP_ERROR_TYPES[http_status]
        or (http_status >= 500 and '"server_error"' or '"invalid_request_error"')
    out = openai_error(json_string(message), type_, "null", "null")
  end
  headers = handle:headers()  -- the earlier handle is out of scope once body() has yielded
  add_retry_after(headers, http_status)
  headers:replace(":status", tostring(http_status))
  headers:replace("content-type", "application/json")
  headers:replace("content-length", tostring(#out))
  if retry_after then headers:replace("retry-after", retry_after) end
  body:setBytes(out)
end
