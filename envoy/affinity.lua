-- genrpc prompt-cache affinity: sets the request header AFFINITY_HEADER (defined just above this file by
-- envoy.yaml.j2) that the affinity routes hash on (MAGLEV cluster), so requests sharing a key reach the same
-- service replica and reuse its prefix cache. The key, first found wins:
--   1. the header itself, sent by the client (native gRPC clients: metadata `x-genrpc-affinity`);
--   2. the JSON body's `prompt_cache_key`, 3. its `user` (json_to_metadata put both into dynamic metadata
--      namespace METADATA_NAMESPACE; this filter runs after it, so the body has been read);
--   4. the API client (`x-client-id`, set by api_key_auth from the Bearer key).
-- Without any, no header: the route without affinity sends the request to the least-loaded replica.
local MAX_KEY_BYTES = 256

local function usable(value)
  if type(value) ~= "string" then return nil end
  -- a value gRPC takes as metadata (printable ASCII, which is all a native client can send): other bytes are
  -- percent-encoded, so a key of any UTF-8 text hashes the same way every time and never breaks the call
  value = value:sub(1, MAX_KEY_BYTES):gsub("[^\32-\126]", function(c) return string.format("%%%02X", c:byte()) end)
  if value == "" then return nil end
  return value
end

function envoy_on_request(request_handle)
  local headers = request_handle:headers()
  local sent = headers:get(AFFINITY_HEADER)
  local body = request_handle:streamInfo():dynamicMetadata():get(METADATA_NAMESPACE) or {}
  -- the value itself, not tagged with its source: a key sent as prompt_cache_key over REST and as gRPC
  -- metadata by a native client reaches the same replica
  local key = usable(sent) or usable(body["prompt_cache_key"]) or usable(body["user"])
    or usable(headers:get("x-client-id"))
  if key ~= nil and key ~= sent then
    headers:replace(AFFINITY_HEADER, key)
    request_handle:clearRouteCache()  -- the route (affinity or not) is chosen on this header
  end
end
