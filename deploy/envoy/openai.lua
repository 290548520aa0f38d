-- The OpenAI surface of the edge, around grpc_json_transcoder.
--
-- Requests: OpenAI clients send streamed and whole requests to the same path and
-- mark streams with "stream": true in the body; those go to the :stream binding.
-- Responses: every error the transcoder or the router returns becomes an
-- OpenAI-shaped body {"error": {"message", "type", "param", "code"}}.

local STREAMABLE = {["/v1/chat/completions"] = true, ["/v1/completions"] = true}

-- TYPES[status] = {type, code}; the generator fills it from deploy/envoy/config.py.
local TYPES = {
%%ERROR_TYPES%%
}

local function is_grpc(headers)
  local ct = headers:get("content-type") or ""
  return ct:find("application/grpc", 1, true) ~= nil
end

function envoy_on_request(handle)
  local headers = handle:headers()
  local path = headers:get(":path")
  if headers:get(":method") ~= "POST" or not STREAMABLE[path] or is_grpc(headers) then
    return
  end
  local body = handle:body()
  if body == nil then
    return
  end
  local raw = body:getBytes(0, body:length())
  -- Inside JSON strings quotes are escaped, so this matches only a real "stream" key.
  if raw:find('"stream"%s*:%s*true') then
    handle:headers():replace(":path", path .. ":stream")
  end
end

-- The value of the top-level "message" key of a JSON object, still JSON-escaped.
local function json_message(raw)
  local _, stop = raw:find('"message"%s*:%s*"')
  if stop == nil then
    return nil
  end
  local i = stop + 1
  while i <= #raw do
    local c = raw:sub(i, i)
    if c == "\\" then
      i = i + 2
    elseif c == '"' then
      return raw:sub(stop + 1, i - 1)
    else
      i = i + 1
    end
  end
  return nil
end

local function json_escape(s)
  s = s:gsub('[%c"\\]', function(c)
    if c == '"' then return '\\"' end
    if c == "\\" then return "\\\\" end
    if c == "\n" then return "\\n" end
    return string.format("\\u%04x", c:byte())
  end)
  return s
end

function envoy_on_response(handle)
  local headers = handle:headers()
  local status = tonumber(headers:get(":status"))
  if status == nil or status < 400 or is_grpc(headers) then
    return
  end
  local content_type = headers:get("content-type") or ""
  local body = handle:body()
  local raw = ""
  if body ~= nil then
    raw = body:getBytes(0, body:length())
  end
  if raw:find('^%s*{%s*"error"%s*:') then
    return
  end
  local message = nil
  if content_type:find("json", 1, true) then
    message = json_message(raw)
  end
  if message == nil then
    message = json_escape(raw)
  end
  if message == "" then
    message = "HTTP " .. status
  end
  local kind = TYPES[status] or {status >= 500 and "server_error" or "invalid_request_error", nil}
  local code = kind[2] and ('"' .. kind[2] .. '"') or "null"
  local out = '{"error":{"message":"' .. message .. '","type":"' .. kind[1] .. '","param":null,"code":' .. code .. '}}'
  if body ~= nil then
    body:setBytes(out)
  end
  headers = handle:headers()
  headers:replace("content-type", "application/json")
  headers:replace("content-length", tostring(#out))
end
